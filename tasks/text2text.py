"""Any user task with an input text and a target text, read from JSONL, JSON or CSV: a new task, no code.

Layout: `<bos_t2t> <source> input <target> target <eos_t2t>`; the input is cut from its end when too long.
Its outputs may be of any length, so training sets the default `max_new_tokens` from the training targets.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from hub.errors import HubError
from hub.task import TaskDefaults
from tasks.source_target import SourceTargetTask

TARGET_LENGTH_MARGIN = 1.25  # room above the longest training target


class Text2TextTask(SourceTargetTask):
    type_name = "text2text"
    description = "any input -> target task from JSONL/JSON/CSV (--input-field, --target-field)"
    special_tokens = ("<bos_t2t>", "<eos_t2t>", "<source>", "<target>")
    source_marker, target_marker = "<source>", "<target>"
    defaults = TaskDefaults(bottleneck=100, lr=1e-3, epochs=5, batch_size=8, grad_accum=2)
    metric = "sacrebleu"

    def __init__(self, max_new_tokens: int | None = None, **config: Any):
        super().__init__(**config)
        self.derived_max_new_tokens = None
        if max_new_tokens is not None:
            self._set_max_new_tokens(max_new_tokens)

    def _set_max_new_tokens(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise HubError(f"text2text max_new_tokens must be a whole number >= 1, got {value!r}")
        self.derived_max_new_tokens = value
        self.defaults = replace(type(self).defaults, max_new_tokens=value)

    def config(self) -> dict:
        derived = {"max_new_tokens": self.derived_max_new_tokens} if self.derived_max_new_tokens else {}
        return {**super().config(), **derived}

    def fit_to_targets(self, target_lengths: list[int]) -> None:
        """The longest training target (at most `max_target_length` tokens, as trained) plus a quarter."""
        longest = min(max(target_lengths), self.defaults.max_target_length)
        self._set_max_new_tokens(math.ceil(longest * TARGET_LENGTH_MARGIN))
