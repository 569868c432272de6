"""Where the adapter store lives: a local folder (`hub.store.local.AdapterStore`, atomic by directory rename)
or any fsspec URL (`FsspecStore`: s3://, gs://, memory://, ..., atomic by a commit marker written last).

Both implement `hub.store.protocol.Store`; `open_store` picks one from the `--store` value.
"""

from __future__ import annotations

from pathlib import Path

from hub.store.local import AdapterStore
from hub.store.protocol import Store

__all__ = ["Store", "open_store"]


def open_store(location: str | Path, **storage_options) -> Store:
    """A local path or file:// URL -> AdapterStore; any other URL (scheme://...) -> FsspecStore."""
    text = str(location)
    if "://" not in text:
        return AdapterStore(text)
    if text.startswith("file://"):
        return AdapterStore(text.removeprefix("file://"))
    from hub.store.backends.fsspec_store import FsspecStore  # fsspec and its backends load only for a URL

    return FsspecStore(text, **storage_options)
