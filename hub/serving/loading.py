"""The CPU tier and loading into it: a cold adapter's weights are read from the store on the loader pool, outside
every lock, bounded by `load_timeout`; only publishing the finished bundle takes the manager's lock. A load that
fails or times out fails the requests waiting for it (503 with the reason) and is tried again after a backoff.

`WeightLoading` is the `AdapterManager`'s half that deals with weights on the CPU (mixed into it: the two share one
lock and the adapters' tier fields); the manager's own module deals with names, pinning and device slots.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import torch

from hub.adapters.registry import get_kind
from hub.errors import AdapterLoadError, HubError, IntegrityError
from hub.model.backbone import Backbone
from hub.serving.sequence import ResidentAdapter
from hub.serving.tiers import LruTier, ManagerSettings
from hub.store.versions import LoadedAdapter

log = logging.getLogger("hub.serving.manager")

RETRY_BACKOFF = (0.5, 30.0)  # seconds before a failed load is tried again: first, and the cap (doubling)


class LoadState(Enum):
    READY = "ready"  # weights on the CPU
    LOADING = "loading"  # a loader thread is reading them
    FAILED = "failed"  # the last load failed and its backoff has not passed: `ResidentAdapter.load_error`


@dataclass
class LoadCounters:
    """Store reads of adapter weights since start-up (what a cold adapter costs)."""

    loads: int = 0
    failures: int = 0
    seconds: float = 0.0  # summed over loads, failed ones included


class WeightLoading:
    """Loading adapters' weights into the CPU tier (see the module docstring); the host (`AdapterManager`) sets
    the attributes below."""

    backbone: Backbone
    settings: ManagerSettings
    lock: threading.RLock
    load_done: threading.Condition
    loader: ThreadPoolExecutor
    cpu: LruTier[ResidentAdapter]
    counters: LoadCounters
    loads_running: int
    on_change: Callable[[], None]

    def request_weights(self, adapter: ResidentAdapter) -> LoadState:
        """Where `adapter`'s weights are, starting a load if none runs and there is room for one; never blocks on
        the store. A load waits (LOADING, not started yet) while every loader thread is busy or while the CPU
        copies loaded for waiting requests already fill the CPU tier, so a burst of cold requests cannot load
        more than the tiers hold (each would be dropped again before it got a slot)."""
        with self.lock:
            if adapter.bundle is not None:
                return LoadState.READY
            now = time.monotonic()
            if adapter.loading_since is not None:
                if now - adapter.loading_since <= self.settings.load_timeout:
                    return LoadState.LOADING
                self._failed(adapter, AdapterLoadError(
                    f"adapter {adapter.ref} could not be loaded: the store did not answer within "
                    f"{self.settings.load_timeout:g}s"))
            if adapter.load_error is not None and now < adapter.retry_at:
                return LoadState.FAILED
            if not self._room_to_load():
                return self._wait_for_room(adapter, now)
            adapter.load_error, adapter.queued_since = None, None
            self.loads_running += 1
            adapter.load_attempt += 1
            adapter.loading_since = now
            self.loader.submit(self._load, adapter, adapter.load_attempt)
            return LoadState.LOADING

    def weights(self, adapter: ResidentAdapter, timeout: float | None = None) -> Any:
        """The adapter's CPU bundle, waiting for the store if it must (CLI, evaluation, a VAE's encoder)."""
        deadline = time.monotonic() + (self.settings.load_timeout if timeout is None else timeout) + 1.0
        while True:
            state = self.request_weights(adapter)
            with self.lock:
                if state is LoadState.READY and adapter.bundle is not None:
                    return adapter.bundle
                if state is LoadState.FAILED:  # a retry another thread started since may have cleared the error
                    raise adapter.load_error or AdapterLoadError(f"adapter {adapter.ref} could not be loaded")
                if time.monotonic() > deadline:
                    raise AdapterLoadError(f"adapter {adapter.ref} could not be loaded in time")
                self.load_done.wait(0.1)

    def _load(self, adapter: ResidentAdapter, attempt: int) -> None:
        """Loader thread: read, verify and unpack outside the lock, then publish under it (if still wanted)."""
        started = time.monotonic()
        try:
            if adapter.fetch is None:
                raise AdapterLoadError(f"adapter {adapter.ref} could not be loaded: it has no store to read it from")
            bundle, rows, count = self._unpack(adapter, adapter.fetch())
        except Exception as err:  # a file changed or went bad since listing, a network error, a wrong shape
            error = err if isinstance(err, AdapterLoadError) else \
                AdapterLoadError(f"adapter {adapter.ref} could not be loaded: {err}")
            with self.lock:
                self.counters.failures += 1
                if adapter.load_attempt == attempt:
                    self._failed(adapter, error)
            log.warning("%s", error)
        else:
            with self.lock:
                if adapter.load_attempt == attempt and not adapter.retired:
                    self._take_weights(adapter, bundle, rows, count)
                    adapter.loading_since, adapter.failures = None, 0
                    self._trim_cpu_tier(keep=adapter)
        finally:
            with self.lock:
                self.loads_running -= 1
                self.counters.loads += 1
                self.counters.seconds += time.monotonic() - started
                self.load_done.notify_all()
            self.on_change()

    def _unpack(self, adapter: ResidentAdapter, loaded: LoadedAdapter) -> tuple[Any, torch.Tensor, int]:
        """The kind's bundle, the task rows and the parameter count, checked against the backbone."""
        config = self.backbone.model.config
        rows = loaded.token_rows.float()
        if rows.ndim != 2 or rows.shape[1] != config.n_embd:
            raise IntegrityError(f"adapter {adapter.ref} has task-token rows of shape {list(rows.shape)}; the "
                                 f"backbone's hidden size is {config.n_embd}")
        kind = get_kind(adapter.kind)
        bundle = kind.load(loaded, config)
        return bundle, rows, kind.parameter_count(bundle)

    def _wait_for_room(self, adapter: ResidentAdapter, now: float) -> LoadState:
        """LOADING while the load waits for a loader; FAILED once it has waited past the load timeout (every
        loader stuck on a store that does not answer)."""
        adapter.queued_since = adapter.queued_since or now
        if now - adapter.queued_since <= self.settings.load_timeout:
            return LoadState.LOADING
        adapter.queued_since = None
        self._failed(adapter, AdapterLoadError(
            f"adapter {adapter.ref} could not be loaded: no loader was free for {self.settings.load_timeout:g}s "
            "(the store is not answering)"))
        return LoadState.FAILED

    def _room_to_load(self) -> bool:
        if self.loads_running >= self.settings.loader_threads:
            return False
        if self.cpu.capacity is None:
            return True
        staged = sum(1 for a in self.cpu.lru_first() if a.in_use > 0)  # loaded for requests still waiting
        return staged + self.loads_running < max(self.cpu.capacity, self.settings.loader_threads)

    def _take_weights(self, adapter: ResidentAdapter, bundle: Any, rows: torch.Tensor, count: int) -> None:
        adapter.bundle, adapter.rows, adapter.parameter_count = bundle, rows, count
        if adapter.slot is None:
            self.cpu.add(adapter)

    @staticmethod
    def _failed(adapter: ResidentAdapter, error: HubError) -> None:
        adapter.load_error, adapter.loading_since = error, None
        adapter.failures += 1
        first, cap = RETRY_BACKOFF
        adapter.retry_at = time.monotonic() + min(cap, first * 2 ** (adapter.failures - 1))

    def _trim_cpu_tier(self, keep: ResidentAdapter | None = None) -> None:
        """Drop the CPU weights of the least recently used adapters without a slot beyond `max_cpu_adapters`:
        only those the store can give back, and none that a waiting request is about to use."""
        excess = self.cpu.excess()
        for adapter in self.cpu.lru_first():
            if excess <= 0:
                return
            if adapter is not keep and adapter.in_use == 0 and adapter.fetch:
                self._drop_weights(adapter)
                excess -= 1

    def _drop_weights(self, adapter: ResidentAdapter) -> None:
        adapter.bundle = adapter.rows = None
        self.cpu.discard(adapter)
