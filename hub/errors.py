"""User-facing errors: the CLI and the server turn these into a clear message, never a traceback."""


class HubError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class NotFoundError(HubError):
    """A named thing (task, adapter, version, file) does not exist."""


class IntegrityError(HubError):
    """Stored files do not match their recorded checksums or format."""


class BackboneMismatchError(HubError):
    """An adapter was trained on a different backbone than the one loaded."""


class CapacityError(HubError):
    """The server is at a limit (queue, resident adapters); the request may be retried shortly."""


class UnavailableError(HubError):
    """Something the server depends on (the adapter store) did not answer in time; retry later."""


class AdapterLoadError(UnavailableError):
    """A listed adapter's weights could not be read when a request needed them (changed or damaged since)."""
