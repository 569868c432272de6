"""A running decode batch: sequences of any task with their merged KV cache, one forward per step.

New sequences are prefilled on their own (left-padded) and merged into the running batch once their prompt
is in the cache. `prefill_chunk` is the budget of prompt tokens one step may prefill across the rows joining
together (as vLLM's `max_num_batched_tokens`): prompts beyond it are prefilled over several steps (chunked
prefill), so the running sequences keep decoding meanwhile and no step grows with the size of a burst.

A prefill keeps only the last position's logits, except for a sequence that asks for its prompt's
log-probabilities (`echo`): it is prefilled in a job of its own that keeps every position's logits, so the
`[chunk, V]` logits it needs cost the other requests nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin

from hub.adapters.base import PREFIX_KEYS, PREFIX_VALUES
from hub.serving.engine import Engine, bind_all_or_release
from hub.serving.logprobs import record_prompt
from hub.serving.output import OutputProcessor
from hub.serving.sequence import Sequence


def left_pad(prompts: list[tuple[list[int], list[int]]], device: torch.device) -> dict[str, torch.Tensor]:
    """Batched inference inputs from (ids, types) pairs: left padding (id and type 0) and an attention mask."""
    width = max(len(ids) for ids, _ in prompts)

    def padded(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([[0] * (width - len(values)) + values for values in rows], device=device)

    return {"input_ids": padded([ids for ids, _ in prompts]), "token_type_ids": padded([t for _, t in prompts]),
            "attention_mask": padded([[1] * len(ids) for ids, _ in prompts])}


def _context(seq: Sequence, no_type_id: int) -> tuple[list[int], list[int]]:
    """Ids and types to prefill: the prompt, and the tokens already generated when a sequence resumes (after
    a failed step, `hub.serving.isolation`)."""
    types = seq.prompt_types or [no_type_id] * len(seq.prompt_ids)
    return seq.prompt_ids + seq.output_ids, types + types[-1:] * len(seq.output_ids)


def prefix_cache(sequences: list[Sequence], device: torch.device,
                 dtype: torch.dtype) -> tuple[DynamicCache, torch.Tensor] | None:
    """A cache holding each row's latent slot (`PREFIX_KEYS`/`PREFIX_VALUES` of its `RowState.extra`) and that
    column's mask [B, 1]: 1 for rows with a slot, 0 (zero keys/values, never attended) for the others; None
    when no row has one. Positions come from the mask, so a row's first token is at 1 after a slot, else 0."""
    slots = [s.row.extra.get(PREFIX_KEYS) for s in sequences]
    if all(k is None for k in slots):
        return None
    like = next(k for k in slots if k is not None)

    def stacked(key: str) -> torch.Tensor:  # [L, B, H, 1, d_head]; zeros for rows without a slot
        rows = [s.row.extra.get(key, torch.zeros_like(like)).to(device=device, dtype=dtype) for s in sequences]
        return torch.stack(rows, dim=1)

    keys, values = stacked(PREFIX_KEYS), stacked(PREFIX_VALUES)
    cache = DynamicCache()
    for layer in range(keys.shape[0]):
        cache.update(keys[layer], values[layer], layer)
    column = torch.tensor([[int(k is not None)] for k in slots], device=device)
    return cache, column


@dataclass
class Prefill:
    """Sequences whose prompts are being written into their own cache, `done` columns so far."""

    sequences: list[Sequence]
    inputs: dict[str, torch.Tensor]
    has_types: bool
    plans: list
    cache: DynamicCache = field(default_factory=DynamicCache)
    prefix: int = 0  # columns of latent slots before the prompts (`prefix_cache`)
    done: int = 0
    every_position: bool = False  # keep every position's logits (prompt log-probabilities)

    @property
    def width(self) -> int:
        return self.inputs["input_ids"].shape[1]


class DecodeBatch:
    """Running sequences with their merged KV cache; each `step` is one forward pass over all of them."""

    def __init__(self, engine: Engine, prefill_chunk: int | None = None):
        self.engine = engine
        self.model = engine.backbone.model
        self.device = engine.backbone.device
        self.prefill_chunk = prefill_chunk  # prompt tokens per step across the joining rows; None: all at once
        self.sequences: list[Sequence] = []
        self.prefilling: list[Prefill] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, T] 1 = real token
        self.plans: list | None = None  # the kinds' plans for `sequences`; None after a membership change
        self.output = OutputProcessor(engine.backbone.vocab_size, engine.backbone.n_positions)

    @property
    def busy(self) -> bool:
        return bool(self.sequences or self.prefilling)

    def all_sequences(self) -> list[Sequence]:
        return self.sequences + [s for p in self.prefilling for s in p.sequences]

    def join(self, sequences: list[Sequence]) -> None:
        """Start prefilling (bound) sequences; without a chunk limit they join the batch now. A sequence that
        asks for prompt log-probabilities gets a prefill of its own."""
        scored = [s for s in sequences if s.params.prompt_logprobs is not None]
        plain = [s for s in sequences if s.params.prompt_logprobs is None]
        for group in [plain] + [[s] for s in scored]:
            if group:
                self._start_prefill(group)

    def _start_prefill(self, sequences: list[Sequence]) -> None:
        inputs = left_pad([_context(s, self.engine.no_type_id) for s in sequences], self.device)
        job = Prefill(list(sequences), inputs, any(s.prompt_types for s in sequences), self.engine.plans(sequences))
        prefix = prefix_cache(sequences, self.device, self.engine.backbone.dtype)
        if prefix is not None:
            job.cache, column = prefix
            inputs["attention_mask"] = torch.cat([column, inputs["attention_mask"]], dim=1)
            job.prefix = 1
        job.every_position = any(s.params.prompt_logprobs is not None for s in sequences)
        self.prefilling.append(job)
        if self.prefill_chunk is None:
            self._prefill_next()

    def step(self) -> None:
        """One prefill chunk (if any prompt is waiting), then one decode step for every running sequence."""
        self._prefill_next()
        self._drop_finished()
        if not self.sequences:
            return
        last = torch.tensor([s.output_ids[-1] for s in self.sequences], device=self.device)[:, None]
        has_types = any(s.prompt_types for s in self.sequences)
        types = torch.tensor([s.prompt_types[-1] if s.prompt_types else self.engine.no_type_id
                              for s in self.sequences], device=self.device)[:, None] if has_types else None
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        if self.plans is None:
            self.plans = self.engine.plans(self.sequences)
        logits = self._forward(last, types, self.mask, self.cache, self.plans)
        self.output.advance(logits, self.sequences)
        self._drop_finished()

    def _prefill_next(self) -> None:
        if not self.prefilling:
            return
        job = self.prefilling[0]
        end = job.width if self.prefill_chunk is None else \
            min(job.width, job.done + max(1, self.prefill_chunk // len(job.sequences)))
        columns = slice(job.done, end)
        types = job.inputs["token_type_ids"][:, columns] if job.has_types else None
        logits = self._forward(job.inputs["input_ids"][:, columns], types,
                               job.inputs["attention_mask"][:, : job.prefix + end], job.cache, job.plans,
                               every_position=job.every_position)
        if job.every_position:
            record_prompt(logits, job.sequences, job.done, job.width, self.engine.backbone.vocab_size)
            logits = logits[:, -1]
        job.done = end
        if end == job.width:
            self.prefilling.pop(0)
            self._merge(job.sequences, job.cache, job.inputs["attention_mask"])
            self.output.advance(logits, job.sequences)

    def _forward(self, ids, types, mask, cache, plans: list, every_position: bool = False) -> torch.Tensor:
        """The last position's logits [B, V]; with `every_position`, every position's [B, T, V]."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with self.engine.applying(plans):
            out = self.model(input_ids=ids, token_type_ids=types, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=0 if every_position else 1)
        return out.logits.float() if every_position else out.logits[:, -1].float()

    def _merge(self, sequences: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append new rows: left-pad the shorter side's keys/values and mask to a common length."""
        self.plans = None
        if not self.sequences:
            self.sequences, self.cache, self.mask = list(sequences), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def left(t: torch.Tensor, dim: int) -> torch.Tensor:
            return F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (width - t.shape[dim], 0))

        for old, new in zip(self._running_cache().layers, cache.layers):
            (old_keys, old_values), (new_keys, new_values) = written(old), written(new)
            old.keys = torch.cat([left(old_keys, 2), left(new_keys, 2)])
            old.values = torch.cat([left(old_values, 2), left(new_values, 2)])
        self.mask = torch.cat([left(self.mask, 1), left(mask, 1)])
        self.sequences += sequences

    def _finish_cancelled(self) -> None:
        for seq in self.sequences:
            if seq.cancelled and not seq.finished:
                seq.finish_reason = "cancelled"
                seq.notify()

    def _drop_finished(self) -> None:
        self._finish_cancelled()
        keep = [i for i, s in enumerate(self.sequences) if not s.finished]
        if len(keep) == len(self.sequences):
            return
        for seq in self.sequences:
            if seq.finished:
                self.engine.release(seq)
        index = torch.tensor(keep, device=self.device, dtype=torch.long)
        self.sequences = [self.sequences[i] for i in keep]
        self.plans = None
        if not keep:
            self.cache, self.mask = None, self.mask[:0, :0]
            return
        self._running_cache().batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Drop leading columns that are padding in every remaining row."""
        lead = int((self.mask.cumsum(-1) == 0).sum(-1).min())
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self._running_cache().layers:
                keys, values = written(layer)
                layer.keys, layer.values = keys[:, :, lead:], values[:, :, lead:]

    def _running_cache(self) -> DynamicCache:
        assert self.cache is not None, "a batch with running sequences holds their cache"
        return self.cache


def written(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values [B, H, T, d_head], which every layer a forward has run through holds."""
    assert layer.keys is not None and layer.values is not None, "a prefilled cache layer holds keys and values"
    return layer.keys, layer.values


@torch.inference_mode()
def decode_to_completion(engine: Engine, sequences: list[Sequence]) -> list[Sequence]:
    """Decode sequences to completion in one fused batch on the calling thread (the CLI, evaluation and
    benchmarks; the server's runner drives `DecodeBatch` itself). Their adapters are loaded first."""
    bind_all_or_release(engine, sequences)
    batch = DecodeBatch(engine)
    batch.join(sequences)
    while batch.busy:
        batch.step()
    return sequences
