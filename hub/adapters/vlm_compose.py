"""Per-request composition of VLM adapters (AdapterHub's `Average` and `Stack`) inside the fused batch.

What `adapters` 1.3.0 computes for SeqBn adapters on GPT-2's block output, with h = x + f (x the residual
stream before the FFN, f the FFN's output) and δ_i(h) = W_up·ReLU(W_down·LN_i(h) + b_d) + b_u:

    Stack(a, b):          h_a = h + δ_a(h);   out = h_a + δ_b(h_a)
    Average(a, b, …; w):  out = x + mean_i(w̄_i · (f + δ_i(h)))  =  h − (1 − 1/k)·f + (1/k)·Σ_i w̄_i·δ_i(h)

w̄ are the weights normalised to sum 1 (`Average`'s default) and k the number of adapters. The library's
`Average` takes `torch.mean` over the weighted outputs, and each output carries the FFN output as the adapter's
residual, so the FFN's contribution is divided by k as well; the hub reproduces that exactly, because the
contract is interop (tests/test_composition.py decodes the same tokens as a plain `adapters` model given the
same block), not a formula of its own.

A composed row becomes entries (row, slot, factor) over stages: stage 0 holds every plain row, each averaged
adapter (factor w̄_i / k) and each stack's first adapter; stage j the stacks' j-th adapters, applied to the
output of stage j - 1. Each stage is an ordinary `VlmPlan` (entries grouped by adapter, one rank-bucket `Bag`
per rank in decode steps), so a composed row reads each of its adapters once per step beside the batch's
other rows; the FFN term of averaged rows is added after stage 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hub.adapters.base import AVERAGE, NO_SLOT, STACK, RowState
from hub.adapters.rank_buckets import Location, RankBucket
from hub.adapters.vlm_plan import VlmPlan, group_entries

Entry = tuple[int, int, float]  # row, slot, the factor of its delta


@dataclass(frozen=True)
class ComposedPlan:
    """A batch with composed rows: the stages, and (averaged rows, their FFN-output factors −(1 − 1/k)), [n]
    each, or None when no row averages."""

    stages: tuple[VlmPlan, ...]
    averaged: tuple[torch.Tensor, torch.Tensor] | None


def row_entries(rows: list[RowState]) -> tuple[list[list[Entry]], list[int], list[float]]:
    """Each stage's entries, and the averaged rows with their FFN factors."""
    stages: list[list[Entry]] = [[]]
    ffn_rows: list[int] = []
    ffn_factors: list[float] = []
    for i, row in enumerate(rows):
        composition = row.composition
        if composition is None:
            if row.slot != NO_SLOT:
                stages[0].append((i, row.slot, 1.0))
        elif composition.block == AVERAGE:
            k = len(composition.slots)
            stages[0] += [(i, slot, weight / k) for slot, weight in zip(composition.slots, composition.weights)]
            ffn_rows.append(i)
            ffn_factors.append(1.0 / k - 1.0)
        elif composition.block == STACK:
            for j, slot in enumerate(composition.slots):
                if j == len(stages):
                    stages.append([])
                stages[j].append((i, slot, 1.0))
        else:
            raise ValueError(f"unknown composition block {composition.block!r}")
    return stages, ffn_rows, ffn_factors


def compose_plan(rows: list[RowState], device: torch.device, locations: dict[int, Location],
                 buckets: dict[int, RankBucket]) -> ComposedPlan:
    stages, ffn_rows, ffn_factors = row_entries(rows)
    plans = []
    for entries in stages:
        factors = [factor for *_, factor in entries]
        plans.append(group_entries([(row, slot) for row, slot, _ in entries], device, locations, buckets,
                                   None if all(f == 1.0 for f in factors) else factors))
    averaged = (torch.tensor(ffn_rows, device=device), torch.tensor(ffn_factors, device=device)) if ffn_rows else None
    return ComposedPlan(tuple(plans), averaged)


def apply_composed(h: torch.Tensor, plan: ComposedPlan, ffn: torch.Tensor | None,
                   apply_stage: Callable[[torch.Tensor, VlmPlan], torch.Tensor]) -> torch.Tensor:
    """The block output h [B, T, d] through every stage; `ffn` [B, T, d] is the block's FFN output (needed when
    the batch has averaged rows)."""
    for j, stage in enumerate(plan.stages):
        if stage.groups:
            h = apply_stage(h, stage)
        if j == 0 and plan.averaged is not None:
            assert ffn is not None, "the FFN output of this forward was not kept"
            rows, factors = plan.averaged
            h = h.index_add(0, rows, ffn.index_select(0, rows) * factors[:, None, None].to(ffn.dtype))
    return h
