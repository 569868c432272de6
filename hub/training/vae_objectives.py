"""The sentence-VAE training objective and its posterior-collapse remedies (spec `vae-and-mvcr.md` §3, §4).

    loss = Rec + β(step) · R(KL)

Rec is the decoder's cross-entropy summed over a sentence's tokens (EOS included, padding excluded). With
`per_sentence` normalisation both terms are per sentence (the ELBO's own weighting); `per_token` divides Rec by
the tokens of the batch instead, as AdaVAE does, which weights KL ≈ (tokens per sentence)× more. R is the KL
with one of the floors below; KL_d = ½(μ_d² + σ_d² − log σ_d² − 1) (`hub.evaluation.vae_metrics.kl_per_dim`).
"""

from __future__ import annotations

import random

import torch

from hub.errors import HubError
from hub.evaluation.vae_metrics import kl_per_dim

BETA_SCHEDULES = ("constant", "linear", "cyclical")
KL_FLOORS = ("none", "total_hinge", "per_dim_mask", "per_dim_clamp")
NORMALISATIONS = ("per_sentence", "per_token")


def beta_at(step: int, total: int, schedule: str, beta_max: float = 1.0, start: int = 0, cycles: int = 4,
            ratio_zero: float = 0.25, ratio_increase: float = 0.25) -> float:
    """β at optimizer step `step` (0-based) of `total`; 0 before `start` (a phase-1 autoencoder).

    constant: β_max.  linear: 0 → β_max over the first `ratio_increase` of the steps after `start`, then β_max.
    cyclical (AdaVAE `frange_cycle_zero_linear`): `cycles` equal cycles, each `ratio_zero` at 0, `ratio_increase`
    a linear ramp, the rest at β_max."""
    if schedule not in BETA_SCHEDULES:
        raise HubError(f"beta schedule must be one of {', '.join(BETA_SCHEDULES)}, not {schedule!r}")
    if step < start:
        return 0.0
    if schedule == "constant":
        return beta_max
    span = max(1, total - start)
    position = (step - start) / span
    if schedule == "cyclical":
        position = (position * cycles) % 1.0
        if position < ratio_zero:
            return 0.0
        position -= ratio_zero
    return beta_max * min(1.0, position / ratio_increase) if ratio_increase > 0 else beta_max


def kl_regulariser(kl_dims: torch.Tensor, floor: str, lam: float) -> torch.Tensor:
    """R from per-sentence, per-dimension KL [B, nz], a mean over the batch of each sentence's term.

    none: Σ_d KL_bd.  total_hinge (AdaVAE fb 1): max(mean_b Σ_d KL_bd, λ·nz), a floor on the batch's total.
    per_dim_mask (Optimus fb_mode 1): Σ_d KL_bd · 1[KL_bd > λ].  per_dim_clamp (P&L `min_z`): Σ_d max(KL_bd, λ).
    The per-dimension floors act on each sentence's KL of each dimension (as both papers' code does), not on a
    batch mean: a sentence below λ in a dimension gets no KL gradient there whatever the other sentences do."""
    if floor == "none":
        return kl_dims.sum(-1).mean()
    if floor == "total_hinge":
        return torch.clamp(kl_dims.sum(-1).mean(), min=lam * kl_dims.shape[-1])
    if floor == "per_dim_mask":
        return (kl_dims * (kl_dims > lam).to(kl_dims.dtype)).sum(-1).mean()
    if floor == "per_dim_clamp":
        return torch.clamp(kl_dims, min=lam).sum(-1).mean()
    raise HubError(f"KL floor must be one of {', '.join(KL_FLOORS)}, not {floor!r}")


def elbo_loss(token_nll: torch.Tensor, target_mask: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
              beta: float, floor: str, lam: float, normalisation: str) -> dict[str, torch.Tensor]:
    """The loss and its parts: `rec` and `kl` are per sentence (batch means) whatever the normalisation.

    token_nll, target_mask: [B, T] (−log p of each target token; 1 where a token is a target)."""
    if normalisation not in NORMALISATIONS:
        raise HubError(f"KL normalisation must be one of {', '.join(NORMALISATIONS)}, not {normalisation!r}")
    rec_sum = (token_nll * target_mask).sum()
    batch = token_nll.shape[0]
    rec_term = rec_sum / batch if normalisation == "per_sentence" else rec_sum / target_mask.sum().clamp(min=1)
    kl_dims = kl_per_dim(mu, logvar)
    loss = rec_term + beta * kl_regulariser(kl_dims, floor, lam)
    return {"loss": loss, "rec": rec_sum.detach() / batch, "kl": kl_dims.sum(-1).mean().detach()}


def delete_tokens(ids: list[int], p: float, rng: random.Random) -> list[int]:
    """P&L's encoder-input denoising: delete randint(0, ⌊p·n⌋) random tokens, never the final one (the EOS)."""
    if p <= 0 or len(ids) < 2:
        return ids
    body = ids[:-1]
    count = rng.randint(0, int(p * len(body)))
    dropped = set(rng.sample(range(len(body)), count))
    return [t for i, t in enumerate(body) if i not in dropped] + ids[-1:]


def drop_words(ids: list[int], p: float, rng: random.Random, replacement: int) -> list[int]:
    """Bowman et al.'s decoder word dropout: each token of `<bos> x <eos>` between the two ends becomes
    `replacement` with probability p (GPT-2 has no <unk>: the hub uses <|endoftext|>). Only the decoder's input
    changes; its targets stay the sentence, so it must take the dropped words from z."""
    if p <= 0 or len(ids) < 3:
        return ids
    return ids[:1] + [replacement if rng.random() < p else t for t in ids[1:-1]] + ids[-1:]
