"""Keeping an engine's adapters equal to the store's newest versions (hot publishing and removal).

A version that fails to load (corrupt, wrong backbone, malformed) is refused with its reason and the rest keep
serving; a name unloaded by an operator stays unloaded until a newer version of it is published.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hub.serving.engine import Engine
from hub.errors import HubError
from hub.store.catalog import AdapterStore

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

    def changed(self) -> bool:
        """Cheap check (directory listing) whether anything was published or removed since the last sync."""
        return self.store.snapshot() != self.seen

    def sync(self) -> SyncResult:
        result = SyncResult()
        self.seen = self.store.snapshot()
        summaries = {s.name: s.latest for s in self.store.list()}
        for name, latest in summaries.items():
            current = self.engine.adapters.get(name)
            if (current and current.version == latest.version) or self.excluded.get(name) == latest.version:
                continue
            if latest.ref in self.refused:
                continue
            try:
                self.engine.add_adapter(self.store.load(latest.ref, self.engine.backbone.fingerprint))
                result.loaded.append(latest.ref)
                self.excluded.pop(name, None)
            except HubError as err:
                self.refused[latest.ref] = result.refused[latest.ref] = str(err)
                log.warning("refused adapter %s: %s", latest.ref, err)
        for name in [n for n in self.engine.adapters if n not in summaries]:
            self.engine.remove_adapter(name)
            result.unloaded.append(name)
        if result.loaded or result.unloaded:
            log.info("adapters loaded %s, unloaded %s", result.loaded, result.unloaded)
        return result

    def unload(self, name: str) -> None:
        """Unload `name` until a newer version is published."""
        adapter = self.engine.adapters.get(name)
        self.engine.remove_adapter(name)
        self.excluded[name] = adapter.version
