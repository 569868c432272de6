"""Keeping the served adapters equal to the store's newest versions (hot publishing and removal).

A version that cannot be served (corrupt, wrong backbone, malformed) is refused with its reason and the rest
keep serving. A version that failed for a reason that may pass (a timeout, a network error, a store that did
not answer) is not refused: it is tried again after a backoff that doubles up to `RETRY_CAP` seconds. A name
unloaded by an operator stays unloaded until a newer version of it is published.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

from hub.errors import BackboneMismatchError, IntegrityError, NotFoundError, UnavailableError
from hub.serving.manager import AdapterManager
from hub.store.fingerprint import check_backbone
from hub.store.protocol import Store
from hub.store.versions import StoredVersion

log = logging.getLogger("hub.serving.sync")

RETRY_FIRST, RETRY_CAP = 1.0, 60.0  # seconds before a transient failure is tried again


def is_transient(err: BaseException) -> bool:
    """Whether trying again later may succeed: I/O and availability errors, not integrity or input errors."""
    if isinstance(err, (IntegrityError, BackboneMismatchError)):
        return False
    return isinstance(err, (UnavailableError, OSError, TimeoutError))


@dataclass
class SyncResult:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass
class Retry:
    reason: str
    failures: int
    at: float  # monotonic time of the next try


class StoreSync:
    def __init__(self, store: Store, manager: AdapterManager):
        self.store = store
        self.manager = manager
        self.refused: dict[str, str] = {}  # ref -> reason, not retried
        self.retries: dict[str, Retry] = {}  # ref -> a transient failure, tried again later
        self.excluded: dict[str, str] = {}  # name -> version unloaded by an operator
        self.seen: dict[str, str] = {}
        self.skipped: dict[str, str] = {}  # ref -> why the store skips it (logged once)

    def changed(self) -> bool:
        """Cheap check (directory or bucket listing) whether anything was published or removed since the last sync."""
        return self.store.snapshot() != self.seen

    def retry_due(self) -> bool:
        now = time.monotonic()
        return any(r.at <= now for r in self.retries.values())

    def sync(self) -> SyncResult:
        result = SyncResult()
        self.seen = self.store.snapshot()
        listing = self.store.list()
        self._log_skipped({k.ref: k.reason for s in listing for k in s.skipped})
        summaries = {s.name: s for s in listing if s.versions}
        for name, summary in summaries.items():
            self._serve_newest(name, summary.versions, result)
        for name in [n for n in self.manager.names() if n not in summaries]:
            self.manager.remove(name)
            result.unloaded.append(name)
        if result.loaded or result.unloaded:
            log.info("adapters loaded %s, unloaded %s", result.loaded, result.unloaded)
        return result

    def _log_skipped(self, skipped: dict[str, str]) -> None:
        for ref, reason in skipped.items():
            if self.skipped.get(ref) != reason:
                log.warning("skipping stored version %s: %s", ref, reason)
        self.skipped = skipped

    def _serve_newest(self, name: str, versions: list[StoredVersion], result: SyncResult) -> None:
        """Serve the newest version of `name` that loads; versions that fail are refused with their reason (or,
        failing for a transient reason, tried again later while an older version serves)."""
        current = self.manager.get(name)
        now = time.monotonic()
        for stored in reversed(versions):
            if (current and current.version == stored.version) or self.excluded.get(name) == stored.version:
                return
            retry = self.retries.get(stored.ref)
            if stored.ref in self.refused or (retry and retry.at > now):
                continue
            try:
                self._add(stored)
            except Exception as err:  # whatever one bad version raises, the other names and versions still load
                self._failed(stored.ref, err, result)
                continue
            self.retries.pop(stored.ref, None)
            result.loaded.append(stored.ref)
            self.excluded.pop(name, None)
            return

    def _failed(self, ref: str, err: Exception, result: SyncResult) -> None:
        reason = result.refused[ref] = str(err) or type(err).__name__
        if is_transient(err):
            failures = self.retries[ref].failures + 1 if ref in self.retries else 1
            delay = min(RETRY_CAP, RETRY_FIRST * 2 ** (failures - 1))
            self.retries[ref] = Retry(reason, failures, time.monotonic() + delay)
            log.warning("could not load adapter %s (retrying in %gs): %s", ref, delay, reason)
        else:
            self.refused[ref] = reason
            log.warning("refused adapter %s: %s", ref, reason)

    def _add(self, stored: StoredVersion) -> None:
        """Load the version's weights now, or, with a bounded CPU tier (`max_cpu_adapters`), only check its
        backbone and metadata and leave the weights in the store until a request needs them."""
        fingerprint = self.manager.backbone.fingerprint
        if self.manager.settings.max_cpu_adapters is None:
            self.manager.add_adapter(self.store.load(stored.ref, fingerprint))
            return
        check_backbone(stored.meta.backbone, fingerprint, f"adapter '{stored.ref}'")
        self.manager.add_stored(stored.name, stored.version, stored.meta,
                                functools.partial(self.store.load, stored.ref, fingerprint))

    def unload(self, name: str) -> None:
        """Unload `name` until a newer version is published."""
        adapter = self.manager.get(name)
        if adapter is None:
            raise NotFoundError(f"no adapter {name!r} is loaded")
        self.manager.remove(name)
        self.excluded[name] = adapter.version
