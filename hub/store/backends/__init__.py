"""Where the adapter store lives: a local folder (`hub.store.catalog.AdapterStore`, atomic by directory rename)
or any fsspec URL (`FsspecStore`: s3://, gs://, memory://, ..., atomic by a commit marker written last).

Both offer the same small interface, `Store`; `open_store` picks one from the `--store` value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from hub.store.catalog import AdapterStore, AdapterSummary, LoadedAdapter, StoredVersion


class Store(Protocol):
    """What the CLI, the server and the engines use of a store."""

    def publish(self, run_export: str | Path, name: str | None = None, version: str | None = None) -> StoredVersion: ...
    def list(self) -> list[AdapterSummary]: ...
    def show(self, ref: str) -> StoredVersion: ...
    def snapshot(self) -> dict[str, str]: ...
    def load(self, ref: str, backbone: dict | None = None) -> LoadedAdapter: ...
    def training_log(self, ref: str) -> tuple[StoredVersion, dict]: ...
    def remove(self, ref: str) -> list[str]: ...
    def update_metrics(self, ref: str, metrics: dict) -> StoredVersion: ...
    def gc(self, older_than_s: float = ...) -> list: ...


def open_store(location: str | Path, **storage_options) -> Store:
    """A local path or file:// URL -> AdapterStore; any other URL (scheme://...) -> FsspecStore."""
    text = str(location)
    if "://" not in text:
        return AdapterStore(text)
    if text.startswith("file://"):
        return AdapterStore(text.removeprefix("file://"))
    from hub.store.backends.fsspec_store import FsspecStore

    return FsspecStore(text, **storage_options)
