"""The runner: one bounded queue for every task, one supervised engine thread, one forward per step.

Between decode steps waiting sequences join the running batch (up to `max_batch`), and finished or
cancelled ones leave (iteration-level scheduling). A sequence whose adapter's weights are still in the store
waits in the queue while the manager's loader reads them, and everything else keeps decoding; one whose
adapter cannot be made resident (every slot busy) waits until a slot frees, as in vLLM. Only a full queue
refuses a request. Callers submit from any thread and learn of progress through `Sequence.on_update`.

Nothing on the engine thread may end it silently: a sequence that cannot be admitted fails alone, a failed
step is bisected (`hub.serving.isolation`), and should the loop itself die, `failure` says why, every
request still held ends with that error and the service reports not ready.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import torch

from hub.errors import CapacityError, HubError, UnavailableError
from hub.serving.batch import DecodeBatch
from hub.serving.engine import Engine
from hub.serving.fairness import FairAdmission, FirstComeFirstServed
from hub.serving.isolation import isolate_failed_step
from hub.serving.loading import LoadState
from hub.serving.occupancy import Occupancy, occupancy
from hub.serving.sequence import Sequence

log = logging.getLogger("hub.serving.scheduler")

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens prefilled per step, across the rows joining
NEW_SLOTS_PER_PASS = 2  # adapters copied into device slots per step (each copy runs on the engine thread)
IDLE_WAIT = 0.01  # seconds the loop waits when every waiting sequence waits for a load or a slot


class QueueFullError(CapacityError):
    """The waiting queue is full; the client should retry later."""


class EngineStoppedError(UnavailableError):
    """The engine thread has stopped (its reason is in /readyz and the log)."""


@dataclass
class SchedulerStats:
    waiting: int = 0
    running: int = 0
    steps: int = 0
    mixed_steps: int = 0  # decode steps whose batch held more than one task
    adapter_loads: int = 0  # store reads of adapter weights (cold adapters), failed ones included
    adapter_load_failures: int = 0
    adapter_load_seconds: float = 0.0


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 32, max_queue: int = 256,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.batch = DecodeBatch(engine, prefill_chunk)
        self.wakeup = threading.Condition()
        self.stopping = False
        self.failure: str | None = None  # why the engine thread died, if it did
        self.new_slots_left = NEW_SLOTS_PER_PASS  # slot copies this admission pass may still make
        self.thread = threading.Thread(target=self._supervised, name="hub-engine", daemon=True)
        self.steps = 0
        self.mixed_steps = 0
        self.fairness: FairAdmission | FirstComeFirstServed = FairAdmission()
        engine.manager.on_change = self.notify

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.failure is None and self.thread.is_alive()

    def notify(self) -> None:
        with self.wakeup:
            self.wakeup.notify()

    def submit(self, sequence: Sequence) -> None:
        self.submit_all([sequence])

    def submit_all(self, sequences: list[Sequence]) -> None:
        """Queue all the sequences or none: a refused batch (queue full, shutting down, engine stopped) has
        given every adapter back."""
        with self.wakeup:
            refusal = self._refusal(len(sequences))
            if refusal is None:
                self.waiting.extend(sequences)
                self.wakeup.notify()
        if refusal is not None:
            for sequence in sequences:
                self.engine.release(sequence)
            raise refusal

    def _refusal(self, count: int) -> HubError | None:
        if self.failure is not None:
            return EngineStoppedError(f"the engine has stopped: {self.failure}")
        if self.stopping:
            return QueueFullError("the server is shutting down")
        if len(self.waiting) + count > self.max_queue:
            return QueueFullError(f"the queue is full ({self.max_queue} waiting requests); retry shortly")
        return None

    def stats(self) -> SchedulerStats:
        loads = self.engine.manager.counters
        return SchedulerStats(len(self.waiting), len(self.batch.all_sequences()), self.steps, self.mixed_steps,
                              loads.loads, loads.failures, loads.seconds)

    def occupancy(self) -> Occupancy:
        """Adapters of running and waiting requests, the KV budget in use, each adapter's tier (for /metrics)."""
        with self.wakeup:
            waiting = list(self.waiting)
        return occupancy(self.batch.all_sequences(), waiting, self.engine.manager, self.max_batch,
                         self.engine.backbone.n_positions)

    def stop(self, timeout: float | None = None) -> None:
        """Finish every submitted sequence, then end the engine thread."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join(timeout)

    # -- the engine thread --------------------------------------------------------------------------------------
    def _supervised(self) -> None:
        """The loop, and what happens if it ever dies: the reason is kept and every request held ends with it."""
        try:
            self._loop()
        except BaseException as err:  # whatever it is, it must be reported, not lost
            self.failure = f"{type(err).__name__}: {err}"
            log.critical("the engine thread stopped: %s", self.failure, exc_info=True)
            with self.wakeup:
                held, self.waiting = list(self.waiting), deque()
            error = EngineStoppedError(f"the engine has stopped: {self.failure}")
            for sequence in held + self.batch.all_sequences():
                self._fail(sequence, error)

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            joining = self._take_waiting()
            if self.stopping and not joining and not self.batch.busy and not self.waiting:
                return
            if not joining and not self.batch.busy:  # every waiting sequence waits for a load or a slot
                with self.wakeup:
                    self.wakeup.wait(IDLE_WAIT)
                continue
            try:
                self.batch.join(joining)
                self.batch.step()
                self.fairness.charge_decoded(self.batch.sequences)
                self.steps += 1
                self.mixed_steps += len({s.adapter.name for s in self.batch.sequences if s.adapter}) > 1
            except Exception:  # a failed step must not stop the server: fail only the sequences that cause it
                log.exception("decode step failed; isolating the failing sequences")
                self._isolate(self.batch.all_sequences() + joining)

    def _take_waiting(self) -> list[Sequence]:
        """Waiting sequences that fit the batch and whose adapters are resident, in fair order across clients
        and adapters (`hub.serving.fairness`). The queue is taken under the condition and admitted outside it,
        so submitting never waits for admission; the ones kept stay in queue order."""
        with self.wakeup:
            while not self.waiting and not self.batch.busy and not self.stopping:
                self.wakeup.wait()
            candidates, self.waiting = self.waiting, deque()
        live = []
        for sequence in candidates:
            if sequence.cancelled:
                self._finish(sequence, "cancelled")
            else:
                live.append(sequence)
        running = self.batch.all_sequences()
        self.new_slots_left = NEW_SLOTS_PER_PASS
        taken = self.fairness.admit(live, running, self.max_batch - len(running), self._admit)
        joined = {id(s) for s in taken}
        kept = deque(s for s in live if id(s) not in joined and not s.finished)
        with self.wakeup:
            kept.extend(self.waiting)  # submitted meanwhile: behind the ones kept
            self.waiting = kept
        return taken

    def _admit(self, sequence: Sequence) -> bool:
        """Bind a sequence whose adapter's weights are on the CPU; start their load otherwise. At most
        `NEW_SLOTS_PER_PASS` adapters are copied into slots per pass (`new_slots_left`), so a burst of cold
        adapters spreads its copies over steps. Whatever goes wrong (a failed load, a bad bundle, an allocation)
        fails this sequence alone."""
        try:
            fresh = sum(adapter.slot is None for adapter in sequence.adapters)  # would be copied into slots now
            states = [(adapter, self.engine.manager.request_weights(adapter)) for adapter in sequence.adapters]
            for adapter, state in states:
                if state is LoadState.FAILED:
                    self._fail(sequence, adapter.load_error)
                    return False
            if any(state is LoadState.LOADING for _, state in states) or (fresh and self.new_slots_left <= 0):
                return False
            bound = self.engine.bind(sequence)
            self.new_slots_left -= fresh if bound else 0
            return bound
        except Exception as err:
            log.warning("request %s could not join a batch: %r", sequence.id, err)
            self._fail(sequence, err if isinstance(err, HubError) else
                       UnavailableError(f"the request's adapter could not be made resident: {err}"))
            return False

    def _fail(self, sequence: Sequence, error: HubError | None) -> None:
        sequence.error = error
        self._finish(sequence, "error")

    def _finish(self, sequence: Sequence, reason: str) -> None:
        """End a sequence that is not (or no longer) in the batch."""
        if not sequence.finished:
            sequence.finish_reason = reason
            self.engine.release(sequence)
            sequence.notify()

    def _isolate(self, sequences: list[Sequence]) -> None:
        """Fail the sequences that make a step fail on their own (`hub.serving.isolation`); requeue the others,
        which re-prefill their prompt and the tokens generated so far when they rejoin."""
        outcome = isolate_failed_step(self.engine, sequences)
        for sequence in outcome.failing:
            self._finish(sequence, "error")
        for sequence in outcome.finished:
            self.engine.release(sequence)
        self.batch = DecodeBatch(self.engine, self.prefill_chunk)
        with self.wakeup:
            self.waiting.extendleft(reversed(outcome.survivors))
