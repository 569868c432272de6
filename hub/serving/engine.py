"""The generation engine: many task adapters resident on one frozen GPT-2, decoded in fused mixed-task batches.

Each resident adapter owns a slot in the `AdapterBank` and a block of rows in the task-token table. A
`DecodeBatch` runs one forward pass per step over all its sequences, whatever their task; sequences join
(after their own prefill, their KV cache merged in) and leave between steps — iteration-level scheduling.
`Engine.run` decodes a list of sequences to completion; the server's scheduler drives `DecodeBatch` itself.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from hub.adapters.vlm import AdapterBank, AdapterWeights, FusedAdapterHooks, stack_layers
from hub.model.backbone import Backbone
from hub.errors import CapacityError, HubError, NotFoundError
from hub.store.catalog import LoadedAdapter, adapter_layers
from hub.store.format import AdapterMeta
from hub.task import Task, TaskCodec
from hub.model.task_tokens import install_task_rows, mask_task_logits


MAX_TEMPERATURE = 5.0
SEED_LIMIT = 2**63  # torch generators take seeds below 2^64; JSON clients commonly handle signed 64-bit
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding; temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        """Refuse any value that could make sampling raise inside a shared decode step."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise HubError("max_new_tokens must be a whole number of at least 1")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (self.temperature, self.top_p)):
            raise HubError("temperature and top_p must be finite numbers")
        if not 0 <= self.temperature <= MAX_TEMPERATURE or not 0 < self.top_p <= 1 or not _is_int(self.top_k) \
                or self.top_k < 0:
            raise HubError(f"need 0 <= temperature <= {MAX_TEMPERATURE:g}, 0 < top_p <= 1 and a whole top_k >= 0")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise HubError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise HubError(f"stop takes at most {MAX_STOP_STRINGS} strings, each 1 to {MAX_STOP_CHARS} characters")


@dataclass
class ResidentAdapter:
    """A published adapter known to the engine; `slot` is None while it waits on the CPU."""

    name: str
    version: str
    task: Task
    meta: AdapterMeta
    weights: AdapterWeights  # [L, ...] on the CPU, the copy that comes back after eviction
    rows: torch.Tensor  # [k, d] on the CPU
    slot: int | None = None
    row_offset: int = 0
    in_use: int = 0
    retired: bool = False  # replaced or unloaded: freed once no running sequence uses it
    codec: TaskCodec | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


_sequence_ids = itertools.count(1)


@dataclass
class Sequence:
    """One request being decoded. `on_update` is called from the engine thread after every step."""

    adapter: ResidentAdapter | None  # None: the plain base model
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
    input_tokens_dropped: int = 0  # cut from a too-long input by a task that truncates (`Task.truncates_input`)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TokenRowTable:
    """Task-token rows of every resident adapter in one table after GPT-2's vocabulary (first-fit blocks).

    Row 0 stays zero: the token type of plain-base rows in a batch whose other rows carry task types.
    """

    ZERO_ROW = 0

    def __init__(self, hidden_size: int, device: torch.device, dtype: torch.dtype, capacity: int = 64):
        self.table = torch.zeros(capacity, hidden_size, device=device, dtype=dtype)
        self.used: dict[int, int] = {self.ZERO_ROW: 1}  # offset -> length

    def allocate(self, rows: torch.Tensor) -> int:
        offset = self._first_fit(rows.shape[0])
        if offset + rows.shape[0] > self.table.shape[0]:
            grown = torch.zeros(2 * max(self.table.shape[0], offset + rows.shape[0]), self.table.shape[1],
                                device=self.table.device, dtype=self.table.dtype)
            grown[: self.table.shape[0]] = self.table
            self.table = grown
        self.table[offset : offset + rows.shape[0]] = rows.to(self.table)
        self.used[offset] = rows.shape[0]
        return offset

    def _first_fit(self, length: int) -> int:
        position = 0
        for offset, used in sorted(self.used.items()):
            if offset - position >= length:
                return position
            position = offset + used
        return position

    def free(self, offset: int) -> None:
        self.used.pop(offset)


class Engine:
    """Resident adapters on one frozen backbone, and fused mixed-task decoding."""

    def __init__(self, backbone: Backbone, make_task: Callable[[str, dict], Task], max_resident: int | None = None):
        self.backbone = backbone
        self.make_task = make_task
        self.max_resident = max_resident
        config = backbone.model.config
        self.bank = AdapterBank(config.n_layer, config.n_embd, backbone.device, backbone.dtype)
        self.hooks = FusedAdapterHooks(backbone.model, bank=self.bank)
        self.token_rows = TokenRowTable(config.n_embd, backbone.device, backbone.dtype)
        self.embedding = install_task_rows(backbone.model, self.token_rows.table)
        self.no_type_id = backbone.vocab_size + TokenRowTable.ZERO_ROW
        self.adapters: OrderedDict[str, ResidentAdapter] = OrderedDict()  # by name, least recently used first
        self.lock = threading.RLock()  # adapter table changes vs. batch building

    # -- adapters -------------------------------------------------------------------------------------------
    def add_adapter(self, loaded: LoadedAdapter) -> ResidentAdapter:
        """Make a stored adapter servable under its name; a newer version replaces the older one."""
        meta = loaded.meta
        config = self.backbone.model.config
        weights = stack_layers(adapter_layers(loaded.adapter_tensors, loaded.name))
        if weights.ln_weight.shape[-1] != config.n_embd:
            raise HubError(f"adapter {loaded.name}@{loaded.version} has d={weights.ln_weight.shape[-1]}, "
                           f"the backbone d={config.n_embd}")
        task = self.make_task(meta.task_type, dict(meta.task_config))
        adapter = ResidentAdapter(loaded.name, loaded.version, task, meta, weights, loaded.token_rows.float())
        with self.lock:
            previous = self.adapters.pop(loaded.name, None)
            if previous is not None:
                self._retire(previous)
            self.adapters[loaded.name] = adapter
            self._make_resident(adapter)
        return adapter

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise NotFoundError(f"no adapter {name!r} is loaded")
            self._retire(self.adapters.pop(name))

    def resolve(self, name: str) -> ResidentAdapter:
        """The adapter serving `name`, made resident on the device if it was evicted."""
        with self.lock:
            if name not in self.adapters:
                available = ", ".join(sorted(self.adapters)) or "none"
                raise NotFoundError(f"unknown task {name!r}; available: {available}")
            adapter = self.adapters[name]
            self.adapters.move_to_end(name)
            self._make_resident(adapter)
            return adapter

    def resident_count(self) -> int:
        return sum(1 for a in self.adapters.values() if a.slot is not None)

    def _make_resident(self, adapter: ResidentAdapter) -> None:
        if adapter.slot is not None:
            return
        if self.max_resident is not None:
            self._evict_for_one()
        adapter.slot = self.bank.add(adapter.weights)
        adapter.row_offset = self.token_rows.allocate(adapter.rows)
        self.embedding.extra.data = self.token_rows.table
        adapter.codec = TaskCodec(adapter.task, self.backbone.tokenizer,
                                  self.backbone.vocab_size + adapter.row_offset, self.backbone.n_positions)

    def _evict_for_one(self) -> None:
        """Move least recently used idle adapters to the CPU until one more fits."""
        resident = [a for a in self.adapters.values() if a.slot is not None]
        for adapter in resident:
            if len(resident) < self.max_resident:
                return
            if adapter.in_use == 0:
                self._free_slot(adapter)
                resident.remove(adapter)
        if len(resident) >= self.max_resident:
            raise CapacityError(f"all {self.max_resident} resident adapters are busy; try again shortly")

    def _free_slot(self, adapter: ResidentAdapter) -> None:
        self.bank.remove(adapter.slot)
        self.token_rows.free(adapter.row_offset)
        adapter.slot = None

    def _retire(self, adapter: ResidentAdapter) -> None:
        adapter.retired = True
        if adapter.in_use == 0 and adapter.slot is not None:
            self._free_slot(adapter)

    def release(self, adapter: ResidentAdapter) -> None:
        """A sequence using `adapter` has left its batch."""
        with self.lock:
            adapter.in_use -= 1
            if adapter.retired and adapter.in_use == 0 and adapter.slot is not None:
                self._free_slot(adapter)

    # -- sequences ------------------------------------------------------------------------------------------
    def new_sequence(self, task_name: str | None, source, params: SamplingParams,
                     prompt_text: str | None = None) -> Sequence:
        """Encode a request's prompt for its task (or raw text for the base model, task_name None)."""
        params.validate()
        limit = self.backbone.n_positions
        if params.max_new_tokens >= limit:
            raise HubError(f"max_new_tokens must be below the model's context of {limit} tokens")
        if task_name is None:
            ids = self.backbone.tokenizer.encode(prompt_text or "")
            if not ids or len(ids) + params.max_new_tokens > limit:
                raise HubError(f"the prompt needs 1 to {limit - params.max_new_tokens} tokens "
                               f"(context {limit} minus max_new_tokens), got {len(ids)}")
            return Sequence(None, ids, None, params, self.backbone.tokenizer.eos_token_id or 0,
                            generator=_generator(params))
        with self.lock:
            adapter = self.resolve(task_name)
            source = adapter.task.parse_input(source)
            ids, types, dropped = adapter.codec.encode_request(source, params.max_new_tokens,
                                                               refuse_cuts=not adapter.task.truncates_input)
            adapter.in_use += 1
        return Sequence(adapter, ids, types, params, adapter.codec.eos_id, generator=_generator(params),
                        input_tokens_dropped=dropped)

    @torch.inference_mode()
    def run(self, sequences: list[Sequence]) -> list[Sequence]:
        """Decode the sequences to completion in one fused batch."""
        batch = DecodeBatch(self)
        batch.join(sequences)
        while batch.sequences:
            batch.step()
        return sequences

    def decode_text(self, ids: list[int]) -> str:
        return self.backbone.tokenizer.decode(ids, skip_special_tokens=False)


def left_pad(prompts: list[tuple[list[int], list[int]]], device: torch.device) -> dict[str, torch.Tensor]:
    """Batched inference inputs from (ids, types) pairs: left padding (id and type 0) and an attention mask."""
    width = max(len(ids) for ids, _ in prompts)
    pad = lambda values: [0] * (width - len(values)) + values  # noqa: E731
    tensor = lambda rows: torch.tensor(rows, device=device)  # noqa: E731
    return {"input_ids": tensor([pad(ids) for ids, _ in prompts]),
            "token_type_ids": tensor([pad(types) for _, types in prompts]),
            "attention_mask": tensor([pad([1] * len(ids)) for ids, _ in prompts])}


def _context(seq: Sequence, no_type_id: int) -> tuple[list[int], list[int]]:
    """Ids and types to prefill: the prompt, and the tokens already generated when a sequence resumes."""
    types = seq.prompt_types or [no_type_id] * len(seq.prompt_ids)
    return seq.prompt_ids + seq.output_ids, types + types[-1:] * len(seq.output_ids)


def _generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    return generator


class DecodeBatch:
    """Running sequences with their merged KV cache; each `step` is one forward pass over all of them."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.model = engine.backbone.model
        self.device = engine.backbone.device
        self.sequences: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, T] 1 = real token
        self.rows: AdapterWeights | None = None

    def join(self, sequences: list[Sequence]) -> None:
        """Prefill new sequences (left-padded, one forward), choose their first token, merge their cache."""
        if not sequences:
            return
        inputs = left_pad([_context(s, self.engine.no_type_id) for s in sequences], self.device)
        types = inputs["token_type_ids"] if any(s.prompt_types for s in sequences) else None
        cache = DynamicCache()
        logits = self._forward(sequences, inputs["input_ids"], types, inputs["attention_mask"], cache, _gather=True)
        self._merge(sequences, cache, inputs["attention_mask"])
        self._advance(logits)

    def step(self) -> None:
        """One decode step for every running sequence."""
        self._drop_finished()
        if not self.sequences:
            return
        last = torch.tensor([s.output_ids[-1] for s in self.sequences], device=self.device)[:, None]
        types = torch.tensor([s.prompt_types[-1] if s.prompt_types else self.engine.no_type_id
                              for s in self.sequences], device=self.device)[:, None]
        has_types = any(s.prompt_types for s in self.sequences)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self._forward(self.sequences, last, types if has_types else None, self.mask, self.cache)
        self._advance(logits)
        self._drop_finished()

    def _forward(self, sequences, ids, types, mask, cache, _gather: bool = False) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        slots = torch.tensor([s.adapter.slot if s.adapter else 0 for s in sequences], device=self.device)
        self.engine.hooks.rows = self.engine.bank.gather(slots) if _gather or self.rows is None else self.rows
        try:
            out = self.model(input_ids=ids, token_type_ids=types, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            gathered, self.engine.hooks.rows = self.engine.hooks.rows, None
        if not _gather:
            self.rows = gathered
        return out.logits[:, -1].float()

    def _merge(self, sequences: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append new rows: left-pad the shorter side's keys/values and mask to a common length."""
        self.rows = None  # membership changed: re-gather adapter rows at the next step
        if not self.sequences:
            self.sequences, self.cache, self.mask = list(sequences), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        left = lambda t, dim: F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (width - t.shape[dim], 0))  # noqa: E731
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([left(old.keys, 2), left(new.keys, 2)])
            old.values = torch.cat([left(old.values, 2), left(new.values, 2)])
        self.mask = torch.cat([left(self.mask, 1), left(mask, 1)])
        self.sequences += sequences

    def _advance(self, logits: torch.Tensor) -> None:
        """Choose each running sequence's next token from the last-position logits of the newest rows."""
        rows = self.sequences[-logits.shape[0]:]
        logits = self._mask_task_tokens(logits, rows)
        greedy = logits.argmax(-1).tolist()
        now = time.monotonic()
        for seq, row_logits, token in zip(rows, logits, greedy):
            if seq.params.temperature > 0:
                token = _sample(row_logits, seq.params, seq.generator)
            seq.first_token_at = seq.first_token_at or now
            self._append(seq, token)

    def _mask_task_tokens(self, logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        """Only a row's own EOS may be chosen among the task tokens, and not as the first token (VLM rule)."""
        eos = torch.tensor([s.eos_id for s in rows], device=logits.device)[:, None]
        allowed = torch.tensor([len(s.output_ids) > 0 for s in rows], device=logits.device)[:, None]
        return mask_task_logits(logits, self.engine.backbone.vocab_size, eos, allowed)

    def _append(self, seq: Sequence, token: int) -> None:
        engine = self.engine
        if token == seq.eos_id:
            seq.finish_reason = "stop"
        else:
            seq.output_ids.append(token)
            seq.text = engine.decode_text(seq.output_ids)
            if seq.adapter is not None:  # a task's target follows its marker after a layout space
                seq.text = seq.text.lstrip()
            cut = min((i for i in (seq.text.find(s) for s in seq.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text, seq.finish_reason = seq.text[:cut], "stop"
            elif len(seq.output_ids) >= seq.params.max_new_tokens:
                seq.finish_reason = "length"
            elif len(seq.prompt_ids) + len(seq.output_ids) >= engine.backbone.n_positions:
                seq.finish_reason = "length"
        if seq.cancelled and not seq.finished:
            seq.finish_reason = "cancelled"
        if seq.on_update:
            seq.on_update(seq)

    def _finish_cancelled(self) -> None:
        for seq in self.sequences:
            if seq.cancelled and not seq.finished:
                seq.finish_reason = "cancelled"
                if seq.on_update:
                    seq.on_update(seq)

    def _drop_finished(self) -> None:
        self._finish_cancelled()
        keep = [i for i, s in enumerate(self.sequences) if not s.finished]
        if len(keep) == len(self.sequences):
            return
        for i, seq in enumerate(self.sequences):
            if seq.finished and seq.adapter is not None:
                self.engine.release(seq.adapter)
        index = torch.tensor(keep, device=self.device, dtype=torch.long)
        self.sequences = [self.sequences[i] for i in keep]
        self.rows = None
        if not keep:
            self.cache, self.mask = None, self.mask[:0, :0]
            return
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Drop leading columns that are padding in every remaining row."""
        lead = int((self.mask.cumsum(-1) == 0).sum(-1).min())
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Temperature, top-k and nucleus (top-p) sampling for one row, reproducible with its own generator."""
    logits = logits.double().cpu()
    logits = (logits - logits.max()) / params.temperature  # the best token at 0: any temperature > 0 stays finite
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs > params.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(0, order, ordered.masked_fill(outside, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
