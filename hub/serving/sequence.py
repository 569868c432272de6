"""What the engine decodes: resident adapters and sequences (one request each)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from hub.adapters.base import RowState
from hub.errors import HubError
from hub.serving.detokenize import IncrementalText
from hub.serving.sampling import SamplingParams
from hub.store.format import AdapterMeta
from hub.task import Task, TaskCodec

if TYPE_CHECKING:
    from hub.serving.composition import ComposedAdapters
    from hub.serving.logprobs import TokenLogprob


@dataclass
class ResidentAdapter:
    """A published adapter known to the engine; `slot` is None while it waits on the CPU.

    `encoder` numbers the task's special tokens from the base vocabulary on (relative ids), so a request is
    tokenized before, and whether or not, its adapter has rows in the token table; the batch shifts them by
    `row_offset` when the sequence joins.
    """

    name: str
    version: str
    task: Task
    meta: AdapterMeta
    kind: str
    bundle: Any  # the kind's weights on the CPU, the copy that comes back after eviction (None: in the store)
    rows: torch.Tensor | None  # task-token rows [k, d] on the CPU (None with `bundle`)
    encoder: TaskCodec
    parameter_count: int
    slot: int | None = None
    row_offset: int = 0
    in_use: int = 0  # sequences that hold it (waiting or running) and pinned users; its weights stay while > 0
    active: int = 0  # of those, the ones bound into a batch or pinned: its slot stays while > 0
    retired: bool = False  # replaced or unloaded: freed once no sequence uses it
    fetch: Callable[[], Any] | None = None  # reads the weights from the store again (`AdapterManager.add_stored`)
    # loading state (`hub.serving.manager`), guarded by the manager's lock
    loading_since: float | None = None  # a loader thread reads the weights since then
    queued_since: float | None = None  # a load waits for a free loader (or CPU room) since then
    load_attempt: int = 0  # a load's result counts only if no later attempt started
    load_error: HubError | None = None  # why the last load failed
    failures: int = 0  # loads failed in a row (the backoff doubles)
    retry_at: float = 0.0  # no new load before this time after a failure

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def codec(self) -> TaskCodec:
        """Absolute ids (the current rows of the token table): valid while the adapter stays resident."""
        first = min(self.encoder.token_ids.values()) + self.row_offset
        return TaskCodec(self.task, self.encoder.tokenizer, first, self.encoder.max_length)


@dataclass(frozen=True)
class TokenPrompt:
    """A prompt given as token ids (OpenAI's and lm-evaluation-harness's list of ints): the model sees exactly
    these tokens, with no task layout; a task's adapter still applies to every position."""

    ids: tuple[int, ...]


_sequence_ids = itertools.count(1)


@dataclass
class Sequence:
    """One request being decoded. `on_update` is called from the engine thread after every step.

    Until the sequence joins a batch, task-token ids in `prompt_ids`, `prompt_types` and `eos_id` are
    relative (see `ResidentAdapter.encoder`); `bound` says they were shifted to the token table's rows.
    """

    adapter: ResidentAdapter | None  # None: the plain base model; a composition's `layout` adapter
    prompt_ids: list[int]
    prompt_types: list[int] | None
    params: SamplingParams
    eos_id: int
    id: int = field(default_factory=lambda: next(_sequence_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    on_update: Callable[["Sequence"], None] | None = None
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    row: RowState = field(default_factory=RowState)
    bound: bool = False
    released: bool = False
    detokenizer: IncrementalText | None = None
    stop_scan: int = 0  # stop strings are searched for in `text` from here on
    error: HubError | None = None  # why it ended with finish_reason "error", when that is known
    input_tokens_dropped: int = 0  # cut from a too-long input by a task that truncates (`Task.truncates_input`)
    logprobs: list["TokenLogprob"] = field(default_factory=list)  # per output token, with `params.logprobs`
    prompt_logprobs: list["TokenLogprob | None"] = field(default_factory=list)  # with `params.prompt_logprobs`
    composed: "ComposedAdapters | None" = None  # several adapters on this row (`hub.serving.composition`)

    @property
    def adapters(self) -> tuple[ResidentAdapter, ...]:
        """Every adapter the sequence uses (and holds while it lives)."""
        if self.composed is not None:
            return self.composed.members
        return () if self.adapter is None else (self.adapter,)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def notify(self) -> None:
        if self.on_update:
            self.on_update(self)
