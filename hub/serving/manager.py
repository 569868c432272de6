"""The adapter manager: which adapters the server knows, which have weights on the CPU, which hold a device
slot — with loading from the store (`hub.serving.loading`) kept apart from slotting (vLLM's `worker_manager` /
`model_manager` split).

Three tiers, as in vLLM: device slots (`max_resident`; least recently used idle adapter evicted first, an
adapter pinned while sequences use it), CPU copies (`max_cpu_adapters`; least recently used dropped first, only
those the store can give back), and the store itself. A store read (file or object GET, checksum, tensor copy)
runs on the loader pool **outside every lock**, bounded by `load_timeout`; only publishing the finished bundle
into the tables takes `lock`, which guards memory and nothing else. A load that fails or times out fails the
requests waiting for it (503 with the reason) and is tried again after a backoff, so a transient store error
never sticks.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from hub.adapters.base import KindRuntime
from hub.adapters.registry import get_kind, task_for
from hub.errors import CapacityError, NotFoundError
from hub.model.backbone import Backbone
from hub.model.task_tokens import install_task_rows
from hub.serving.loading import LoadCounters, WeightLoading
from hub.serving.sequence import ResidentAdapter
from hub.serving.tiers import LruTier, ManagerSettings
from hub.serving.token_rows import TokenRowTable
from hub.store.format import AdapterMeta
from hub.store.versions import LoadedAdapter
from hub.task import Task, TaskCodec

log = logging.getLogger("hub.serving.manager")


class AdapterManager(WeightLoading):
    """Known adapters by name (least recently used first), their CPU and device tiers, and their loading."""

    def __init__(self, backbone: Backbone, make_task: Callable[[str, dict], Task],
                 settings: ManagerSettings | None = None):
        self.backbone = backbone
        self.make_task = make_task
        self.settings = settings or ManagerSettings()
        self.runtimes: dict[str, KindRuntime] = {}
        self.token_rows = TokenRowTable(backbone.model.config.n_embd, backbone.device, backbone.dtype)
        self.embedding = install_task_rows(backbone.model, self.token_rows.table)
        self.adapters: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self.lock = threading.RLock()  # guards the tables above and adapters' tier fields; never held over I/O
        self.load_done = threading.Condition(self.lock)  # notified whenever a load ends, well or badly
        self.loader = ThreadPoolExecutor(self.settings.loader_threads, thread_name_prefix="hub-loader")
        self.on_change: Callable[[], None] = lambda: None  # a load finished or failed (the runner wakes up)
        self.counters = LoadCounters()
        self.device: LruTier[ResidentAdapter] = LruTier(self.settings.max_resident)  # adapters holding a slot
        self.cpu: LruTier[ResidentAdapter] = LruTier(self.settings.max_cpu_adapters)  # weights on the CPU, no slot
        self.loads_running = 0

    def close(self) -> None:
        """Remove every kind's hooks; loads still running finish into nothing."""
        self.loader.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            for runtime in self.runtimes.values():
                runtime.close()
            self.runtimes.clear()

    # -- known adapters -------------------------------------------------------------------------------------
    def add_adapter(self, loaded: LoadedAdapter) -> ResidentAdapter:
        """Serve a loaded version under its name (a newer version replaces the older one); it takes a slot now
        if one is free, else when a request needs it."""
        adapter = self._known(loaded.name, loaded.version, loaded.meta, None)
        weights = self._unpack(adapter, loaded)
        with self.lock:
            self._take_weights(adapter, *weights)
            self._register(adapter)
            self.make_resident(adapter)
        return adapter

    def add_stored(self, name: str, version: str, meta: AdapterMeta,
                   fetch: Callable[[], LoadedAdapter]) -> ResidentAdapter:
        """Know a stored version by its metadata only; `fetch` reads its weights when a request first needs them
        (and again after the CPU tier dropped them). Nothing is read here."""
        adapter = self._known(name, version, meta, fetch)
        with self.lock:
            self._register(adapter)
        return adapter

    def _known(self, name: str, version: str, meta: AdapterMeta, fetch) -> ResidentAdapter:
        task = task_for(meta, self.make_task)
        encoder = TaskCodec(task, self.backbone.tokenizer, self.backbone.vocab_size, self.backbone.n_positions)
        return ResidentAdapter(name, version, task, meta, meta.adapter_kind, None, None, encoder,
                               meta.trainable_params, fetch=fetch)

    def _register(self, adapter: ResidentAdapter) -> None:
        previous = self.adapters.pop(adapter.name, None)
        if previous is not None:
            self._retire(previous)
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> ResidentAdapter:
        with self.lock:
            if name not in self.adapters:
                raise NotFoundError(f"no adapter {name!r} is loaded")
            adapter = self.adapters.pop(name)
            self._retire(adapter)
            return adapter

    def resolve(self, name: str) -> ResidentAdapter:
        """The adapter serving `name` now (most recently used from now on); its weights may still be in the store."""
        with self.lock:
            if name not in self.adapters:
                available = ", ".join(sorted(self.adapters)) or "none"
                raise NotFoundError(f"unknown task {name!r}; available: {available}")
            self.adapters.move_to_end(name)
            return self.adapters[name]

    def get(self, name: str) -> ResidentAdapter | None:
        with self.lock:
            return self.adapters.get(name)

    def known(self) -> list[ResidentAdapter]:
        """A snapshot of every known adapter (safe to iterate while other threads add and evict)."""
        with self.lock:
            return list(self.adapters.values())

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.adapters)

    def resident_count(self) -> int:
        with self.lock:
            return len(self.device)

    def tiers(self) -> dict[str, str]:
        """Each known adapter's tier: "device" (a slot), "cpu" (weights in memory) or "store" (not read yet)."""
        with self.lock:
            return {name: "device" if a.slot is not None else "cpu" if a.bundle is not None else "store"
                    for name, a in self.adapters.items()}

    def resident_bytes(self) -> int:
        """Device bytes of every kind's resident adapter weights (the 'bank')."""
        with self.lock:
            return sum(runtime.resident_bytes() for runtime in self.runtimes.values())

    # -- pinning ----------------------------------------------------------------------------------------------
    def acquire(self, adapter: ResidentAdapter) -> None:
        """Count one user of `adapter`: it keeps its slot (once it has one) until `release`."""
        with self.lock:
            adapter.in_use += 1

    def release(self, adapter: ResidentAdapter) -> None:
        with self.lock:
            adapter.in_use -= 1
            if adapter.retired and adapter.in_use == 0:
                self._drop(adapter)

    def activate(self, adapters: tuple[ResidentAdapter, ...], step: int = 1) -> None:
        """Count (step 1) or uncount (-1) a user bound to the adapters' slots (a sequence in the batch)."""
        with self.lock:
            for adapter in adapters:
                adapter.active += step

    @contextmanager
    def pinned(self, adapter: ResidentAdapter) -> Iterator[Any]:
        """`adapter` resident and kept so within the block (e.g. a sentence VAE's encoder pass); yields its
        device copy. Waits for its weights; CapacityError when every slot is busy."""
        self.acquire(adapter)
        try:
            self.weights(adapter)
            with self.lock:
                if not self.make_resident(adapter):
                    raise CapacityError(f"all {self.settings.max_resident} resident adapters are busy; retry shortly")
                self.activate((adapter,))
            assert adapter.slot is not None, "a resident adapter has a slot"
            try:
                yield self.runtimes[adapter.kind].slots[adapter.slot]
            finally:
                self.activate((adapter,), -1)
        finally:
            self.release(adapter)

    # -- device slots (memory only, under the lock) -----------------------------------------------------------
    def make_resident(self, adapter: ResidentAdapter) -> bool:
        """Give `adapter` (whose weights are on the CPU) a slot and token rows, evicting least recently used idle
        adapters beyond `max_resident`; False when it has no weights yet or every slot is busy. All or nothing:
        when copying raises, the adapter holds neither a slot nor rows."""
        with self.lock:
            if adapter.slot is not None:
                self.device.touch(adapter)
                return True
            if adapter.bundle is None or adapter.retired or not self._room_for(1):
                return False
            assert adapter.rows is not None, "an adapter's task rows come and go with its bundle"
            runtime = self._runtime(adapter.kind)
            offset = self.token_rows.allocate(adapter.rows)
            try:
                slot = runtime.add(adapter.bundle)
            except BaseException:
                self.token_rows.free(offset)
                raise
            adapter.slot, adapter.row_offset = slot, offset
            self.cpu.discard(adapter)
            self.device.add(adapter)
            self.embedding.extra.data = self.token_rows.table
            self._trim_cpu_tier()  # adapters evicted to make room may now be beyond the CPU tier
            return True

    def make_resident_all(self, adapters: tuple[ResidentAdapter, ...]) -> bool:
        """Every adapter resident (a composition's), or none made so: False while one has no weights yet or the
        slots cannot all be found. Beyond idle adapters this may evict adapters that only waiting requests hold
        (none bound into the batch): they come back when their request joins, and two compositions waiting for
        each other's slots can never hold every slot between them."""
        with self.lock:
            missing = [a for a in adapters if a.slot is None]
            if any(a.bundle is None or a.retired for a in missing):
                return False
            if missing and not self._room_for(len(missing), keep=adapters, waiting_too=True):
                return False
            for adapter in adapters:
                if not self.make_resident(adapter):  # room was made: only a failed copy raises here
                    return False
            return True

    def _room_for(self, count: int, keep: tuple[ResidentAdapter, ...] = (), waiting_too: bool = False) -> bool:
        """Whether `count` slots are free after evicting least recently used idle adapters, and with `waiting_too`
        then adapters that only waiting requests hold (none bound, none in `keep`); nothing is evicted when the
        room cannot be made."""
        capacity = self.device.capacity
        if capacity is None:
            return True
        kept = {id(a) for a in keep}
        idle = [a for a in self.device.lru_first() if a.in_use == 0]
        waiting_only = [a for a in self.device.lru_first() if a.in_use > 0 and a.active == 0 and id(a) not in kept
                        ] if waiting_too else []
        if capacity - len(self.device) + len(idle) + len(waiting_only) < count:
            return False
        for adapter in idle + waiting_only:
            if capacity - len(self.device) >= count:
                break
            self._free_slot(adapter)
        return True

    def _runtime(self, kind: str) -> KindRuntime:
        if kind not in self.runtimes:
            self.runtimes[kind] = get_kind(kind).runtime(self.backbone.model, self.settings.bank_dtype)
        return self.runtimes[kind]

    def _free_slot(self, adapter: ResidentAdapter) -> None:
        """Back to the CPU tier (the bundle stays; `_trim_cpu_tier` decides whether it is kept)."""
        assert adapter.slot is not None, "only adapters in the device tier are freed, and they hold a slot"
        self.runtimes[adapter.kind].remove(adapter.slot)
        self.token_rows.free(adapter.row_offset)
        adapter.slot = None
        self.device.discard(adapter)
        self.cpu.add(adapter)

    def _retire(self, adapter: ResidentAdapter) -> None:
        adapter.retired = True
        if adapter.in_use == 0:
            self._drop(adapter)

    def _drop(self, adapter: ResidentAdapter) -> None:
        """A retired adapter nobody uses any more leaves both tiers."""
        if adapter.slot is not None:
            self._free_slot(adapter)
        self._drop_weights(adapter)
