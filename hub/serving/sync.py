"""Keeping an engine's adapters equal to the store's newest versions (hot publishing and removal).

A version that fails to load (corrupt, wrong backbone, malformed) is refused with its reason and the rest keep
serving; a name unloaded by an operator stays unloaded until a newer version of it is published.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from hub.serving.engine import Engine
from hub.store.catalog import AdapterStore, StoredVersion, check_backbone

log = logging.getLogger("hub.serving.sync")


@dataclass
class SyncResult:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


class StoreSync:
    def __init__(self, store: AdapterStore, engine: Engine):
        self.store = store
        self.engine = engine
        self.refused: dict[str, str] = {}  # ref -> reason, not retried
        self.excluded: dict[str, str] = {}  # name -> version unloaded by an operator
        self.seen: dict[str, str] = {}
        self.skipped: dict[str, str] = {}  # ref -> why the store skips it (logged once)

    def changed(self) -> bool:
        """Cheap check (directory listing) whether anything was published or removed since the last sync."""
        return self.store.snapshot() != self.seen

    def sync(self) -> SyncResult:
        result = SyncResult()
        self.seen = self.store.snapshot()
        listing = self.store.list()
        self._log_skipped({k.ref: k.reason for s in listing for k in s.skipped})
        summaries = {s.name: s for s in listing if s.versions}
        for name, summary in summaries.items():
            self._serve_newest(name, summary.versions, result)
        for name in [n for n in self.engine.adapters if n not in summaries]:
            self.engine.remove_adapter(name)
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
        """Serve the newest version of `name` that loads; versions that fail are refused with their reason."""
        current = self.engine.adapters.get(name)
        for stored in reversed(versions):
            if (current and current.version == stored.version) or self.excluded.get(name) == stored.version:
                return
            if stored.ref in self.refused:
                continue
            try:
                self._add(stored)
            except Exception as err:  # whatever one bad version raises, the other names and versions still load
                self.refused[stored.ref] = result.refused[stored.ref] = str(err) or type(err).__name__
                log.warning("refused adapter %s: %s", stored.ref, result.refused[stored.ref])
                continue
            result.loaded.append(stored.ref)
            self.excluded.pop(name, None)
            return

    def _add(self, stored: StoredVersion) -> None:
        """Load the version's weights now, or, with a bounded CPU tier (`Engine.max_cpu_adapters`), only check
        its backbone and metadata and leave the weights in the store until a request needs them."""
        fingerprint = self.engine.backbone.fingerprint
        if self.engine.max_cpu_adapters is None:
            self.engine.add_adapter(self.store.load(stored.ref, fingerprint))
            return
        check_backbone(stored, fingerprint)
        self.engine.add_stored(stored.name, stored.version, stored.meta,
                               functools.partial(self.store.load, stored.ref, fingerprint))

    def unload(self, name: str) -> None:
        """Unload `name` until a newer version is published."""
        adapter = self.engine.adapters.get(name)
        self.engine.remove_adapter(name)
        self.excluded[name] = adapter.version
