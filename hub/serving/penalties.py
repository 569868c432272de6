"""Repetition controls over a batch's `[B, V]` logits, each row by its own settings (rows without any are left
as they are and cost nothing).

- `presence_penalty` / `frequency_penalty` (OpenAI): subtract `presence` once from every token the row has
  generated and `frequency` per time it was generated.
- `repetition_penalty` (vLLM, HF's CTRL rule): a token seen in the prompt or the output has its logit divided by
  the penalty if positive, multiplied if negative. Task tokens (markers, EOS) are left out.
- `no_repeat_ngram_size` n (HF generate): a token that would complete an n-gram the row has already generated
  is banned. Only the output is searched, so a task's answer may still copy names from its input.
"""

from __future__ import annotations

import torch

from hub.serving.sequence import Sequence


def apply_penalties(logits: torch.Tensor, rows: list[Sequence], base_vocab: int) -> torch.Tensor:
    """`logits` [B, V] with each penalised row's settings applied (a new tensor when any row has some)."""
    chosen = [i for i, s in enumerate(rows) if s.params.penalised]
    if not chosen:
        return logits
    logits = logits.clone()
    for i in chosen:
        logits[i] = _penalised_row(logits[i], rows[i], base_vocab)
    return logits


def _penalised_row(row: torch.Tensor, seq: Sequence, base_vocab: int) -> torch.Tensor:
    params = seq.params
    if params.presence_penalty or params.frequency_penalty:
        counts = token_counts(seq.output_ids, row.shape[0], row.device)
        row = row - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    if params.repetition_penalty != 1.0:
        seen = [t for t in seq.prompt_ids + seq.output_ids if t < base_vocab]
        if seen:
            index = torch.tensor(sorted(set(seen)), device=row.device)
            values = row[index]
            penalty = params.repetition_penalty
            row = row.index_put((index,), torch.where(values > 0, values / penalty, values * penalty))
    if params.no_repeat_ngram_size:
        banned = banned_ngram_tokens(seq.output_ids, params.no_repeat_ngram_size)
        if banned:
            row = row.index_fill(0, torch.tensor(banned, device=row.device), float("-inf"))
    return row


def token_counts(ids: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    counts = torch.zeros(vocab, device=device)
    if ids:
        counts.index_add_(0, torch.tensor(ids, device=device), torch.ones(len(ids), device=device))
    return counts


def banned_ngram_tokens(ids: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of `ids` if appended (HF's `_get_ngrams` rule)."""
    if len(ids) < n:
        return []
    if n == 1:
        return sorted(set(ids))
    tail = tuple(ids[len(ids) - n + 1:])
    return sorted({ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i:i + n - 1]) == tail})
