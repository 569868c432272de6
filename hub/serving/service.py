"""The in-process serving backend: what the HTTP layer calls (`hub.serving.protocol.ServingBackend`), no HTTP.

`HubService` owns the engine, its runner (`Scheduler`) and the store sync. A request resolves its adapter once
(`resolve`), is parsed and tokenized in a worker thread outside every lock, queued, and streamed back; the
engine thread wakes a request's coroutine at most once per pending update, so a 64-row batch does not post 64
callbacks per step onto the event loop. Store I/O runs off the event loop with a timeout (`StoreCalls`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch

from hub.errors import HubError, UnavailableError
from hub.model.backbone import Backbone
from hub.model.dtypes import DTYPE_NAMES
from hub.serving.composition import Composition, resolve_composition
from hub.serving.engine import Engine
from hub.serving.fairness import ADMISSION
from hub.serving.logprobs import rendered_logprobs
from hub.serving.tiers import ManagerSettings
from hub.serving.occupancy import Occupancy
from hub.serving.protocol import parse_chat, request_params, Disconnected, RequestResult, TaskRef
from hub.serving.sampling import SamplingParams
from hub.serving.scheduler import DEFAULT_PREFILL_CHUNK, Scheduler, SchedulerStats
from hub.serving.sequence import ResidentAdapter, Sequence
from hub.store.format import AdapterMeta
from hub.serving.sync import StoreSync, SyncResult
from hub.serving.vae import VaeService
from hub.store.protocol import Store
from hub.task import Task

log = logging.getLogger("hub.serving.service")

BANK_DTYPES = DTYPE_NAMES
UPDATE_POLL = 0.25  # seconds between checks for a client that left or a deadline that passed


class RequestTimeoutError(HubError):
    """A request ran past the server's --request-timeout."""


class GenerationFailedError(HubError):
    """The engine failed while decoding this request (the server log has the details)."""


@dataclass
class ServiceSettings:
    max_batch: int = 32
    max_queue: int = 256
    max_resident: int | None = None
    max_cpu_adapters: int | None = None  # None: every served adapter's weights stay in CPU memory
    bank_dtype: str = "float32"  # resident VLM adapter weights: float32, float16 or bfloat16
    request_timeout: float = 120.0
    watch_interval: float = 0.5
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    store_timeout: float = 30.0  # a store call (listing, or an adapter's load) that takes longer answers 503
    admission: str = "fair"  # the order waiting requests join in: fair (VTC over keys and adapters) or fcfs

    def __post_init__(self) -> None:
        if self.bank_dtype not in BANK_DTYPES:
            raise HubError(f"bank_dtype must be one of {', '.join(BANK_DTYPES)}, not {self.bank_dtype!r}")
        if self.admission not in ADMISSION:
            raise HubError(f"admission must be one of {', '.join(ADMISSION)}, not {self.admission!r}")

    def manager_settings(self) -> ManagerSettings:
        return ManagerSettings(self.max_resident, self.max_cpu_adapters, getattr(torch, self.bank_dtype),
                               load_timeout=self.store_timeout)


class StoreCalls:
    """Store I/O on one worker thread, off the event loop, each call bounded by a timeout.

    A call that hangs (a FIFO, a dead network filesystem) holds the one worker; later calls answer
    `UnavailableError` at once instead of piling up threads, and the event loop (health checks, streams) never
    waits."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-store")
        self.running: dict[Future, float] = {}  # call -> when it started
        self.lock = threading.Lock()  # `running` is changed from the worker thread (done callbacks)

    async def __call__(self, fn: Callable, *args):
        now = time.monotonic()
        with self.lock:
            stuck = any(now - started > self.timeout for call, started in self.running.items() if not call.done())
        if stuck:
            raise UnavailableError(f"the adapter store has not answered for over {self.timeout:g}s; retry later")
        call = self.executor.submit(fn, *args)
        with self.lock:
            self.running[call] = now
        call.add_done_callback(self._done)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(call), self.timeout)
        except asyncio.TimeoutError:
            raise UnavailableError(f"the adapter store did not answer within {self.timeout:g}s; retry later") from None

    def _done(self, call: Future) -> None:
        with self.lock:
            self.running.pop(call, None)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class Updates:
    """Wakes one request's coroutine from the engine thread; a wake-up already on its way is not repeated."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.event = asyncio.Event()
        self.pending = False

    def __call__(self, sequence: Sequence) -> None:  # engine thread
        if not self.pending:
            self.pending = True
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self.pending = False
        self.event.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self.event.clear()


@dataclass
class Handle:
    """A submitted request: its sequence and the wake-ups it gets from the engine thread."""

    sequence: Sequence
    updates: Updates
    submitted: float = field(default_factory=time.monotonic)

    def result(self) -> RequestResult:
        return sequence_result(self.sequence)


def sequence_result(sequence: Sequence) -> RequestResult:
    adapter = sequence.adapter
    return RequestResult(adapter.name if adapter else "base", adapter.version if adapter else "",
                         adapter.task.type_name if adapter else "base", sequence.text, sequence.finish_reason,
                         len(sequence.prompt_ids), len(sequence.output_ids), sequence.input_tokens_dropped,
                         sequence.created, sequence.first_token_at, sequence.params.client,
                         **rendered_logprobs(sequence),
                         composed=sequence.composed.refs if sequence.composed else None)


class HubService:
    def __init__(self, backbone: Backbone, store: Store, make_task: Callable[[str, dict], Task],
                 settings: ServiceSettings | None = None):
        self.settings = settings or ServiceSettings()
        self.store = store
        self.engine = Engine(backbone, make_task, self.settings.manager_settings())
        self.manager = self.engine.manager
        self.scheduler = Scheduler(self.engine, self.settings.max_batch, self.settings.max_queue,
                                   self.settings.prefill_chunk)
        self.scheduler.fairness = ADMISSION[self.settings.admission]()
        self.sync = StoreSync(store, self.manager)
        self.store_calls = StoreCalls(self.settings.store_timeout)
        self.vae = VaeService(self)
        # e.g. the HTTP layer's metrics: a request that ended, with its finish reason or cancelled/timeout
        self.on_finished: Callable[[RequestResult, str], None] | None = None
        self.ready = False

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def start(self, preload: bool = True) -> None:
        """Remove stale staging leftovers, load the store's adapters, start the engine thread. Without `preload`
        the caller loads adapters when it needs them (a Ray replica, `server.ray.replica`)."""
        if preload:
            for path in await self.store_calls(self.store.gc):
                log.info("removed stale store leftover %s", path)
            await self.store_calls(self.sync.sync)
        self.scheduler.start()
        self.ready = True
        log.info("serving %s", ", ".join(self.manager.names()) or "no adapters yet")

    def stop(self) -> None:
        """Finish running and waiting sequences, then stop the engine thread (blocking)."""
        self.ready = False
        self.scheduler.stop()
        self.store_calls.close()

    def not_ready_reason(self) -> str | None:
        if self.scheduler.failure is not None:
            return f"the engine thread stopped: {self.scheduler.failure}"
        return None if self.ready else "starting or stopping"

    async def watch_store(self) -> None:
        """Keep the engine in step with the store: newly published versions become servable without a restart.

        A local store wakes on its inotify events (through `watchfiles`) and at least every `watch_interval`
        seconds; an object store (s3://, gs://, memory://) is polled every `watch_interval`. Versions that
        failed to load for a transient reason are tried again when their backoff has passed. 0 turns it off.
        """
        interval = self.settings.watch_interval
        if interval <= 0:
            return
        async for _ in store_events(self.store, interval):
            try:
                if self.sync.retry_due() or await self.store_calls(self.sync.changed):
                    await self.store_calls(self.sync.sync)
            except Exception:  # keep watching whatever one sync met
                log.exception("store sync failed")

    async def store_call(self, fn: Callable, *args) -> Any:
        return await self.store_calls(fn, *args)

    # -- requests -------------------------------------------------------------------------------------------
    async def resolve(self, task: str, composition: Composition | None = None) -> TaskRef:
        """The version serving `task` now; the request decodes with exactly it, whatever is published later. With
        a composition, every member's version, checked (`hub.serving.composition`); `task` is its layout."""
        if composition is None:
            adapter = self.manager.resolve(task)
            return TaskRef(adapter.name, adapter.version, adapter.task, adapter)
        composed = resolve_composition(composition, self.manager.resolve, self.manager.settings.max_resident)
        layout = composed.layout
        return TaskRef(layout.name, layout.version, layout.task, layout, composition,
                       tuple(m.version for m in composed.members), composed)

    params = staticmethod(request_params)
    parse_chat = staticmethod(parse_chat)

    async def submit(self, task: TaskRef | None, source: Any, params: SamplingParams,
                     prompt_text: str | None = None) -> Handle:
        """Parse and tokenize (in a worker thread), then queue; raises HubError for bad input or a full queue."""
        adapter: ResidentAdapter | None = task.adapter if task else None
        composed = task.composed if task else None
        sequence = await asyncio.to_thread(self.engine.new_sequence, adapter, source, params, prompt_text, composed)
        return self.submit_all([sequence])[0]

    def submit_all(self, sequences: list[Sequence]) -> list[Handle]:
        """Queue built sequences, all or none (a refusal releases every one); from the event loop's thread."""
        loop = asyncio.get_running_loop()
        handles = [Handle(s, Updates(loop)) for s in sequences]
        for handle in handles:
            handle.sequence.on_update = handle.updates
        self.scheduler.submit_all(sequences)
        return handles

    async def stream(self, handle: Handle, disconnected: Disconnected) -> AsyncIterator[str]:
        """Yield new text as it is decoded; cancel the sequence if the client leaves or time runs out."""
        sequence = handle.sequence
        deadline = handle.submitted + self.settings.request_timeout
        sent, next_check, outcome = 0, 0.0, "cancelled"
        try:
            while True:
                await handle.updates.wait(UPDATE_POLL)
                now = time.monotonic()
                if now > deadline:
                    outcome = "timeout"
                    raise RequestTimeoutError(f"request timed out after {self.settings.request_timeout:g}s")
                if now > next_check:
                    next_check = now + UPDATE_POLL
                    if await disconnected():
                        return
                done = sequence.finished  # read first: text read after it is complete when done
                ready = sendable_text(sequence, done)
                if len(ready) > sent:
                    yield ready[sent:]
                    sent = len(ready)
                if done:
                    if sequence.finish_reason == "error":
                        raise sequence.error or GenerationFailedError(
                            "generation failed; the server log has the details")
                    return
        finally:  # every request is counted once, cancelled and timed-out ones included
            finish_reason = sequence.finish_reason  # read once: the engine thread may set it meanwhile
            reason = finish_reason if finish_reason is not None else outcome
            self.cancel(handle)
            if self.on_finished:
                self.on_finished(handle.result(), reason)

    async def complete(self, handle: Handle, disconnected: Disconnected) -> str:
        return "".join([piece async for piece in self.stream(handle, disconnected)])

    @staticmethod
    def cancel(handle: Handle) -> None:
        """Stop decoding a request (the engine thread drops it at its next step)."""
        if not handle.sequence.finished:
            handle.sequence.cancelled = True

    # -- tables and operations ----------------------------------------------------------------------------
    def task_names(self) -> list[str]:
        return self.manager.names()

    async def list_tasks(self) -> dict:
        """Served tasks, and the store's versions that are skipped or refused, with why."""
        listing = await self.store_calls(self.store.list)
        versions = {s.name: [v.version for v in s.versions] for s in listing}
        usable = {v.ref for s in listing for v in s.versions}
        skipped = [{"ref": k.ref, "reason": k.reason} for s in listing for k in s.skipped]
        skipped += [{"ref": ref, "reason": reason} for ref, reason in self.sync.refused.items() if ref in usable]
        adapters = sorted(self.manager.known(), key=lambda a: a.name)
        return {"tasks": [describe(a.name, a.version, a.meta, versions.get(a.name, []), a.slot is not None)
                          for a in adapters], "skipped": skipped}

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def resident_count(self) -> int:
        return self.manager.resident_count()

    def adapter_tiers(self) -> dict[str, str]:
        return self.manager.tiers()

    def occupancy(self) -> Occupancy:
        return self.scheduler.occupancy()

    async def reload(self) -> SyncResult:
        return await self.store_calls(self.sync.sync)

    def unload(self, name: str) -> None:
        self.sync.unload(name)


async def store_events(store: Store, interval: float) -> AsyncIterator[None]:
    """Yield after each burst of file events in a local store (inotify) or every `interval` seconds; an object
    store, or a machine without an inotify binding, is polled."""
    root = getattr(store, "root", None)
    watch: Callable[..., AsyncIterator[Any]] | None
    try:
        from watchfiles import awatch
    except ImportError:  # no inotify binding
        watch = None
    else:
        watch = awatch
    if watch is None or not isinstance(root, Path):
        while True:
            await asyncio.sleep(interval)
            yield
    async for _ in watch(root, debounce=5, step=5, rust_timeout=int(interval * 1000),
                         yield_on_timeout=True, watch_filter=None):
        yield


def describe(name: str, version: str, meta: AdapterMeta, versions: list[str], resident: bool) -> dict:
    """A served task as `/v1/tasks` lists it, in this process and under Ray (`server.ray.ingress`)."""
    return {"name": name, "version": version, "versions": versions, "task_type": meta.task_type,
            "bottleneck": meta.bottleneck, "trainable_pct": meta.trainable_pct, "metrics": dict(meta.metrics),
            "resident": resident, "parent": backbone_name(meta.backbone)}


def backbone_name(fingerprint) -> str | None:
    """The name of an adapter's backbone (its folder's name, or the hub id it was loaded from)."""
    source = fingerprint.get("source")
    return Path(source).name if source else None


def sendable_text(sequence: Sequence, done: bool) -> str:
    """Text safe to send: all of it once done, else without a possible beginning of a stop string (the
    engine's text never ends in a partial UTF-8 character)."""
    text = sequence.text
    if done:
        return text
    hold = max((len(s) - 1 for s in sequence.params.stop), default=0)
    return text[: len(text) - hold] if hold else text
