"""Failure isolation for the decode loop: when a step fails, the sequences that make it fail are found by
bisection and only they fail; every other sequence keeps decoding.

A step that raised may have left the batch's KV cache half updated, so each trial starts from scratch: a fresh
`DecodeBatch` re-prefills a group's whole context (prompt plus the tokens generated so far) and chooses each
sequence's next token, which is what the failed step was doing. A trial that succeeds has therefore advanced its
sequences by one correctly chosen token. k failing sequences among n cost O(k log n) prefills, paid only when a
step fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

from hub.serving.batch import DecodeBatch
from hub.serving.engine import Engine
from hub.serving.sequence import Sequence

log = logging.getLogger("hub.serving.isolation")

T = TypeVar("T")


def bisect_failing(items: list[T], fails: Callable[[list[T]], bool]) -> list[T]:
    """The items that make `fails` true on their own, given that a group fails when it holds one of them."""
    if not items or not fails(items):
        return []
    if len(items) == 1:
        return list(items)
    middle = len(items) // 2
    return bisect_failing(items[:middle], fails) + bisect_failing(items[middle:], fails)


@dataclass
class Isolation:
    survivors: list[Sequence]  # to resume (re-prefilled when they rejoin a batch)
    failing: list[Sequence]  # fail these, and only these
    finished: list[Sequence]  # finished normally during a trial: their adapters are to be released


def isolate_failed_step(engine: Engine, sequences: list[Sequence]) -> Isolation:
    """Split the sequences of a failed step into those to resume and those that fail on their own."""
    alive = list({s.id: s for s in sequences if not s.finished}.values())

    def fails(group: list[Sequence]) -> bool:
        trial = [s for s in group if not s.finished]
        try:
            DecodeBatch(engine).join(trial)
        except Exception as err:  # any error: this group holds a failing sequence
            log.warning("decode trial of %d sequences failed: %r", len(trial), err)
            return True
        return False

    failing_ids = {s.id for s in bisect_failing(alive, fails)}
    return Isolation(survivors=[s for s in alive if s.id not in failing_ids and not s.finished],
                     failing=[s for s in alive if s.id in failing_ids],
                     finished=[s for s in alive if s.id not in failing_ids and s.finished])
