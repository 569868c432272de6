"""Iteration-level scheduling: one bounded queue for every task, one engine thread, one forward per step.

Between decode steps waiting sequences join the running batch (up to `max_batch`), and finished or
cancelled ones leave. Callers submit from any thread and learn of progress through `Sequence.on_update`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import torch

from hub.serving.engine import DecodeBatch, Engine, Sequence
from hub.errors import CapacityError
from hub.serving.isolation import isolate_failed_step

log = logging.getLogger("hub.serving.scheduler")


class QueueFullError(CapacityError):
    """The waiting queue is full; the client should retry later."""


@dataclass
class SchedulerStats:
    waiting: int = 0
    running: int = 0
    steps: int = 0


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 32, max_queue: int = 256):
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.waiting: deque[Sequence] = deque()
        self.batch = DecodeBatch(engine)
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="hub-engine", daemon=True)
        self.steps = 0

    def start(self) -> None:
        self.thread.start()

    def submit(self, sequence: Sequence) -> None:
        with self.wakeup:
            if self.stopping:
                raise QueueFullError("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting requests); retry shortly")
            self.waiting.append(sequence)
            self.wakeup.notify()

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.waiting), len(self.batch.sequences), self.steps)

    def stop(self, timeout: float | None = None) -> None:
        """Finish every submitted sequence, then end the engine thread."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join(timeout)

    def _take_waiting(self) -> list[Sequence]:
        with self.wakeup:
            while not self.waiting and not self.batch.sequences and not self.stopping:
                self.wakeup.wait()
            room = self.max_batch - len(self.batch.sequences)
            taken = []
            while self.waiting and len(taken) < room:
                sequence = self.waiting.popleft()
                if sequence.cancelled:
                    self._finish_unstarted(sequence)
                else:
                    taken.append(sequence)
            return taken

    def _finish_unstarted(self, sequence: Sequence) -> None:
        sequence.finish_reason = "cancelled"
        if sequence.adapter is not None:
            self.engine.release(sequence.adapter)
        if sequence.on_update:
            sequence.on_update(sequence)

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            joining = self._take_waiting()
            if self.stopping and not joining and not self.batch.sequences and not self.waiting:
                return
            try:
                with self.engine.lock:
                    self.batch.join(joining)
                    self.batch.step()
                self.steps += 1
            except Exception:  # a failed step must not stop the server: fail only the sequences that cause it
                log.exception("decode step failed; isolating the failing sequences")
                self._isolate(self.batch.sequences + joining)

    def _isolate(self, sequences: list[Sequence]) -> None:
        """Fail the sequences that make a step fail on their own (`hub.serving.isolation`); resume the others."""
        outcome = isolate_failed_step(self.engine, sequences)
        self._fail(outcome.failing)
        for sequence in outcome.finished:
            if sequence.adapter is not None:
                self.engine.release(sequence.adapter)
        self.batch = DecodeBatch(self.engine)
        with self.wakeup:
            self.waiting.extendleft(reversed(outcome.survivors))

    def _fail(self, sequences: list[Sequence]) -> None:
        for sequence in {s.id: s for s in sequences}.values():
            if not sequence.finished:
                sequence.finish_reason = "error"
                if sequence.adapter is not None:
                    self.engine.release(sequence.adapter)
                if sequence.on_update:
                    sequence.on_update(sequence)
