"""Token log-probabilities, as a plain forward pass of a row's own model gives them.

A row's distribution is over the base vocabulary and its own adapter's task tokens (the other adapters' rows of
the shared token table are not part of its model); temperature, top-k/p, penalties and the serving rules for task
tokens change the token choice, never these numbers. Generated tokens get theirs from the step's `[B, V]` logits;
prompt tokens (`echo`) from the prefill, whose forward keeps every position's logits only for the rows that ask
(`hub.serving.batch`). Only rows that ask cost anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hub.serving.sequence import Sequence


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the row's `top` alternatives (id, log-probability), best first."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def own_task_rows(seq: Sequence) -> range:
    """The ids of the row's own task tokens in the shared table (empty for the plain base model)."""
    adapter = seq.adapter
    if adapter is None or not seq.bound:
        return range(0)
    first = min(adapter.encoder.token_ids.values()) + adapter.row_offset
    return range(first, first + len(adapter.task.special_tokens))


def row_log_probs(logits: torch.Tensor, seq: Sequence, base_vocab: int) -> torch.Tensor:
    """Log-softmax of `logits` [..., V] over the base vocabulary and the row's own task tokens."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[:base_vocab] = True
    own = own_task_rows(seq)
    keep[own.start:own.stop] = True
    return logits.float().masked_fill(~keep, float("-inf")).log_softmax(-1)


def entries(log_probs: torch.Tensor, chosen: list[int], top: int) -> list[TokenLogprob]:
    """The chosen tokens' entries from their positions' log-probabilities `log_probs` [T, V]."""
    picked = log_probs.gather(1, torch.tensor(chosen, device=log_probs.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = log_probs.topk(top, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(token, value, alternatives) for token, value, alternatives in zip(chosen, picked, tops)]


def record_generated(logits: torch.Tensor, rows: list[Sequence], tokens: list[int], base_vocab: int) -> None:
    """Append each asking row's chosen token (not its EOS, which is not part of the output) to its logprobs."""
    for i, (seq, token) in enumerate(zip(rows, tokens)):
        top = seq.params.logprobs
        if top is not None and token != seq.eos_id:
            seq.logprobs += entries(row_log_probs(logits[i:i + 1], seq, base_vocab), [token], top)


def record_prompt(logits: torch.Tensor, rows: list[Sequence], done: int, width: int, base_vocab: int) -> None:
    """Prompt entries from a prefill chunk's logits [B, C, V] covering columns `done` to `done + C` of prompts
    left-padded to `width`. The logits at column c score the token at c + 1; a prompt's first token has none."""
    for i, seq in enumerate(rows):
        top = seq.params.prompt_logprobs
        if top is None:
            continue
        start = width - len(seq.prompt_ids) - len(seq.output_ids)  # the row's first column
        if done <= start:
            seq.prompt_logprobs = [None]
        first, last = max(done, start), min(done + logits.shape[1], start + len(seq.prompt_ids) - 1)
        if first < last:
            targets = seq.prompt_ids[first + 1 - start:last + 1 - start]
            log_probs = row_log_probs(logits[i, first - done:last - done], seq, base_vocab)
            seq.prompt_logprobs += entries(log_probs, targets, top)
