"""Iteration-level scheduling: one bounded queue for every task, one engine thread, one forward per step.

Between decode steps waiting sequences join the running batch (up to `max_batch`), and finished or
cancelled ones leave. A sequence whose adapter cannot be made resident (every slot busy) stays in the queue
until a slot frees, as vLLM does; only a full queue refuses a request. Callers submit from any thread and
learn of progress through `Sequence.on_update`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import torch

from hub.errors import CapacityError, HubError
from hub.serving.batch import DecodeBatch
from hub.serving.engine import Engine, Sequence
from hub.serving.isolation import isolate_failed_step

log = logging.getLogger("hub.serving.scheduler")

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per row and step


class QueueFullError(CapacityError):
    """The waiting queue is full; the client should retry later."""


@dataclass
class SchedulerStats:
    waiting: int = 0
    running: int = 0
    steps: int = 0
    mixed_steps: int = 0  # decode steps whose batch held more than one task


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
        self.thread = threading.Thread(target=self._loop, name="hub-engine", daemon=True)
        self.steps = 0
        self.mixed_steps = 0

    def start(self) -> None:
        self.thread.start()

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence; a refused one (queue full, shutting down) has given its adapter back."""
        with self.wakeup:
            if self.stopping or len(self.waiting) >= self.max_queue:
                self.engine.release(sequence)
                raise QueueFullError("the server is shutting down" if self.stopping else
                                     f"the queue is full ({self.max_queue} waiting requests); retry shortly")
            self.waiting.append(sequence)
            self.wakeup.notify()

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.waiting), len(self.batch.all_sequences()), self.steps, self.mixed_steps)

    def stop(self, timeout: float | None = None) -> None:
        """Finish every submitted sequence, then end the engine thread."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join(timeout)

    def _take_waiting(self) -> list[Sequence]:
        """Waiting sequences that fit the batch and whose adapters could be made resident, in queue order."""
        with self.wakeup:
            while not self.waiting and not self.batch.busy and not self.stopping:
                self.wakeup.wait()
            room = self.max_batch - len(self.batch.all_sequences())
            taken, kept = [], deque()
            while self.waiting:
                sequence = self.waiting.popleft()
                if sequence.cancelled:
                    self._finish(sequence, "cancelled")
                elif len(taken) < room and self._bind(sequence):
                    taken.append(sequence)
                elif not sequence.finished:
                    kept.append(sequence)
            self.waiting = kept
            return taken

    def _bind(self, sequence: Sequence) -> bool:
        """Bind a sequence to its adapter's slot; one whose adapter cannot be read from the store fails alone."""
        try:
            return self.engine.bind(sequence)
        except HubError as err:
            log.warning("request %s failed: %s", sequence.id, err)
            sequence.error = err
            self._finish(sequence, "error")
            return False

    def _finish(self, sequence: Sequence, reason: str) -> None:
        """End a sequence that is not (or no longer) in the batch."""
        if not sequence.finished:
            sequence.finish_reason = reason
            self.engine.release(sequence)
            sequence.notify()

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            joining = self._take_waiting()
            if self.stopping and not joining and not self.batch.busy and not self.waiting:
                return
            if not joining and not self.batch.busy:  # every waiting adapter's slot is busy elsewhere: wait
                with self.wakeup:
                    self.wakeup.wait(0.01)
                continue
            try:
                self.batch.join(joining)
                self.batch.step()
                self.steps += 1
                self.mixed_steps += len({s.adapter.name for s in self.batch.sequences if s.adapter}) > 1
            except Exception:  # a failed step must not stop the server: fail only the sequences that cause it
                log.exception("decode step failed; isolating the failing sequences")
                self._isolate(self.batch.all_sequences() + joining)

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
