"""The serving service: what the HTTP layer calls, with no HTTP in it.

`HubService` owns the engine, its scheduler and the store sync. Routes (FastAPI today; a Ray Serve deployment
could wrap the same object) submit requests, stream or await their text, cancel them, list tasks and reload
the store. Parsing and tokenizing a request run in a worker thread, outside the engine lock; the engine thread
wakes a request's coroutine at most once per pending update, so a 64-row batch does not post 64 callbacks
per step onto the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from hub.errors import HubError
from hub.model.backbone import Backbone
from hub.serving.engine import Engine, ResidentAdapter, Sequence, adapter_info
from hub.serving.sampling import SamplingParams, sampling_params
from hub.serving.scheduler import DEFAULT_PREFILL_CHUNK, Scheduler
from hub.serving.sync import StoreSync, SyncResult
from hub.store.catalog import AdapterStore
from hub.task import Task

log = logging.getLogger("hub.serving.service")

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
    request_timeout: float = 120.0
    watch_interval: float = 0.5
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK


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


class HubService:
    def __init__(self, backbone: Backbone, store: AdapterStore, make_task: Callable[[str, dict], Task],
                 settings: ServiceSettings | None = None):
        self.settings = settings or ServiceSettings()
        self.store = store
        self.engine = Engine(backbone, make_task, max_resident=self.settings.max_resident)
        self.scheduler = Scheduler(self.engine, self.settings.max_batch, self.settings.max_queue,
                                   self.settings.prefill_chunk)
        self.sync = StoreSync(store, self.engine)
        self.on_finished: Callable[[Sequence], None] | None = None  # e.g. the HTTP layer's metrics
        self.ready = False

    # -- lifecycle (blocking: call from a worker thread) --------------------------------------------------------
    def start(self) -> None:
        self.sync.sync()
        self.scheduler.start()
        self.ready = True
        log.info("serving %s", ", ".join(sorted(self.engine.adapters)) or "no adapters yet")

    def stop(self) -> None:
        """Finish running and waiting sequences, then stop the engine thread."""
        self.ready = False
        self.scheduler.stop()

    async def watch_store(self) -> None:
        """Poll the store; newly published versions become servable without a restart."""
        interval = self.settings.watch_interval
        while interval > 0:
            await asyncio.sleep(interval)
            try:
                if self.sync.changed():
                    await asyncio.to_thread(self.sync.sync)
            except Exception:  # keep watching whatever one sync met
                log.exception("store sync failed")

    # -- requests -------------------------------------------------------------------------------------------
    def resolve(self, task: str) -> ResidentAdapter:
        return self.engine.resolve(task)

    def params(self, task: str, **fields) -> SamplingParams:
        """A request's sampling fields (None: not given), defaulting to the task's length."""
        return sampling_params(self.resolve(task).task.defaults.max_new_tokens, **fields)

    async def submit(self, task: str | None, source: Any, params: SamplingParams,
                     prompt_text: str | None = None) -> Handle:
        """Parse and tokenize (in a worker thread), then queue; raises HubError for bad input or a full queue."""
        sequence = await asyncio.to_thread(self.engine.new_sequence, task, source, params, prompt_text)
        return self.submit_sequence(sequence)

    def submit_sequence(self, sequence: Sequence) -> Handle:
        """Queue a sequence built by the engine (from the event loop's thread)."""
        handle = Handle(sequence, Updates(asyncio.get_running_loop()))
        sequence.on_update = handle.updates
        self.scheduler.submit(sequence)
        return handle

    async def stream(self, handle: Handle, disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
        """Yield new text as it is decoded; cancel the sequence if the client leaves or time runs out."""
        sequence = handle.sequence
        deadline = handle.submitted + self.settings.request_timeout
        sent, next_check = 0, 0.0
        try:
            while True:
                await handle.updates.wait(UPDATE_POLL)
                now = time.monotonic()
                if now > deadline:
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
                    if self.on_finished:
                        self.on_finished(sequence)
                    if sequence.finish_reason == "error":
                        raise GenerationFailedError("generation failed; the server log has the details")
                    return
        finally:
            self.cancel(handle)

    async def complete(self, handle: Handle, disconnected: Callable[[], Awaitable[bool]]) -> str:
        return "".join([piece async for piece in self.stream(handle, disconnected)])

    @staticmethod
    def cancel(handle: Handle) -> None:
        """Stop decoding a request (the engine thread drops it at its next step)."""
        if not handle.sequence.finished:
            handle.sequence.cancelled = True

    # -- tables and operations ----------------------------------------------------------------------------
    def task_names(self) -> list[str]:
        return sorted(self.engine.adapters)

    def list_tasks(self) -> list[dict]:
        with self.engine.lock:
            resident = dict(self.engine.adapters)
        versions = {s.name: [v.version for v in s.versions] for s in self.store.list()}
        return [describe(resident[name], versions.get(name, [])) for name in sorted(resident)]

    def reload(self) -> SyncResult:
        return self.sync.sync()

    def unload(self, name: str) -> None:
        self.sync.unload(name)


def describe(adapter: ResidentAdapter, versions: list[str]) -> dict:
    info = adapter_info(adapter.meta)
    return {"name": adapter.name, "version": adapter.version, "versions": versions, "task_type": info.task_type,
            "bottleneck": info.bottleneck, "trainable_pct": info.trainable_pct,
            "resident": adapter.slot is not None}


def sendable_text(sequence: Sequence, done: bool) -> str:
    """Text safe to send: all of it once done, else without a possible beginning of a stop string (the
    engine's text never ends in a partial UTF-8 character)."""
    text = sequence.text
    if done:
        return text
    hold = max((len(s) - 1 for s in sequence.params.stop), default=0)
    return text[: len(text) - hold] if hold else text
