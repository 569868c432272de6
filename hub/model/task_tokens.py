"""Task special tokens: extra embedding rows after GPT-2's frozen vocabulary, on the input and output side.

Ids `0..V-1` are GPT-2's own tokens (frozen `wte`); ids `V..V+n-1` index a separate `[n, d]` table of task
rows. Training holds one task's k rows as a trainable parameter, so nothing else of `wte` can move; serving
holds every loaded task's rows side by side. GPT-2 ties its LM head to `wte`, so the head scores the extra
rows too (the `<eos_task>` logit is h·e_eos). Token-type ids go through the same table, as in VLM.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ExtendedEmbedding(nn.Module):
    """Replaces `transformer.wte`: frozen GPT-2 rows, then the task rows in `extra`."""

    def __init__(self, base: nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.base = base
        self.extra = extra if isinstance(extra, nn.Parameter) else nn.Parameter(extra, requires_grad=False)

    @property
    def base_vocab(self) -> int:
        return self.base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """GPT-2's own matrix, for code that reads `wte.weight` (e.g. the model's dtype)."""
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_extra = (ids >= self.base_vocab).unsqueeze(-1)
        base = self.base(ids.clamp(max=self.base_vocab - 1))
        if self.extra.shape[0] == 0:
            return base
        extra = F.embedding((ids - self.base_vocab).clamp(min=0, max=self.extra.shape[0] - 1), self.extra)
        return torch.where(is_extra, extra, base)


class ExtendedLMHead(nn.Module):
    """Replaces `lm_head`: logits over GPT-2's vocabulary followed by one logit per task row."""

    def __init__(self, embedding: ExtendedEmbedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        base = F.linear(hidden, self.embedding.base.weight)
        return torch.cat([base, F.linear(hidden, self.embedding.extra.to(hidden.dtype))], dim=-1)


def mask_task_logits(logits: torch.Tensor, base_vocab: int, eos_ids: torch.Tensor,
                     allow_eos: torch.Tensor) -> torch.Tensor:
    """Among the task rows (ids from `base_vocab` on) only each row's own EOS may be chosen, and only where
    `allow_eos` (not as the first token: spec §5). `eos_ids` and `allow_eos` are [B, 1]."""
    eos_logit = torch.where(allow_eos, logits.gather(1, eos_ids), torch.full_like(logits[:, :1], float("-inf")))
    masked = logits.clone()
    masked[:, base_vocab:] = float("-inf")
    return masked.scatter(1, eos_ids, eos_logit)


def install_task_rows(model: nn.Module, extra: torch.Tensor) -> ExtendedEmbedding:
    """Swap a GPT2LMHeadModel's `wte` and `lm_head` for the extended pair sharing `extra`."""
    transformer: Any = model.transformer
    wte = transformer.wte
    base = wte.base if isinstance(wte, ExtendedEmbedding) else wte
    embedding = ExtendedEmbedding(base, extra)
    transformer.wte = embedding
    model.lm_head = ExtendedLMHead(embedding)
    return embedding


def new_task_rows(k: int, hidden_size: int, init_std: float, generator: torch.Generator | None = None) -> nn.Parameter:
    """k trainable rows, initialised as GPT-2 initialises embeddings: N(0, initializer_range)."""
    rows = torch.randn(k, hidden_size, generator=generator) * init_std
    return nn.Parameter(rows)
