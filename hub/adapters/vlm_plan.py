"""How a batch's rows meet the resident VLM adapters: rows grouped by adapter into a `VlmPlan`, and the deltas of
a plan added to a block's output (`add_deltas`). Also used by the sentence VAE's decoder adapters
(`hub.adapters.vae_runtime`) and by compositions (`hub.adapters.vlm_compose`)."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hub.adapters.base import NO_SLOT, RowState
from hub.adapters.rank_buckets import Bag, Location, RankBucket

DENSE_ROWS = 4  # an adapter with this many rows in a decode step runs as dense matmuls, not through its bucket


@dataclass(frozen=True)
class VlmPlan:
    """Rows grouped for one batch, after reordering by `order` (None: rows already in order; `order` also says
    where the deltas are added back). `groups` pairs each slot with its rows (dense matmuls: prefill);
    `decode` covers the same rows for steps of one token per row: rank buckets' `Bag`s for adapters with
    few rows, dense groups for the others. A plan with `order` None and one group covering every row applies
    to a batch of any size."""

    groups: tuple[tuple[int, slice], ...]
    order: torch.Tensor | None
    decode: tuple[tuple[int, slice] | Bag, ...]
    scale: torch.Tensor | None = None  # [n] per entry in order: its delta's factor (a composition's weights)


def group_rows(rows: list[RowState] | None, slot: int, device: torch.device,
               locations: dict[int, Location] | None = None, buckets: dict[int, RankBucket] | None = None) -> VlmPlan:
    """Rows grouped by slot (rows None: `slot` on every row of a batch of any size); NO_SLOT rows are left
    out. See `group_entries`."""
    if rows is None:
        whole: tuple[tuple[int, slice], ...] = ((slot, slice(None)),) if slot != NO_SLOT else ()
        return VlmPlan(whole, None, whole)
    return group_entries([(i, row.slot) for i, row in enumerate(rows) if row.slot != NO_SLOT], device,
                         locations, buckets)


def group_entries(entries: list[tuple[int, int]], device: torch.device,
                  locations: dict[int, Location] | None = None, buckets: dict[int, RankBucket] | None = None,
                  scale: list[float] | None = None) -> VlmPlan:
    """(row, slot) entries sorted so each slot's entries are one slice; a row may have several entries (the
    adapters of a composition, `hub.adapters.vlm_compose`), each with its delta's factor in `scale`. With
    `locations` (slot -> place in `buckets`), slots with fewer than DENSE_ROWS entries are ordered by rank after
    the others, so each bucket's entries are one `Bag` slice in decode steps."""
    count = Counter(slot for _, slot in entries)

    def bucket(s: int) -> int:
        return locations[s].rank if locations and count[s] < DENSE_ROWS else 0  # 0: dense

    ranked = sorted(range(len(entries)), key=lambda e: (bucket(entries[e][1]), entries[e][1]))
    order = [entries[e][0] for e in ranked]
    slots = [entries[e][1] for e in ranked]
    groups = tuple((s, slice(start, start + count[s])) for start, s in _run_starts(slots))
    decode: list = []
    for rank, grouped in itertools.groupby(groups, key=lambda group: bucket(group[0])):
        members = list(grouped)
        if not rank:
            decode += members
            continue
        assert locations is not None and buckets is not None  # a rank other than 0 comes from them
        span = slice(members[0][1].start, members[-1][1].stop)
        decode.append(buckets[rank].bag(span, [locations[s].index for s in slots[span]]))
    identity = order == list(range(len(order)))
    factors = None if scale is None else torch.tensor([scale[e] for e in ranked], device=device)
    return VlmPlan(groups, None if identity else torch.tensor(order, device=device), tuple(decode), factors)


def _run_starts(values: list[int]) -> list[tuple[int, int]]:
    """(start, value) of each run of equal values."""
    return [(i, v) for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def add_deltas(h: torch.Tensor, plan: VlmPlan, layer_of, eps: float, bag_delta=None,
               inputs: torch.Tensor | None = None) -> torch.Tensor:
    """h plus each group's adapter delta on its rows; `layer_of(slot)` gives that slot's `LayerWeights`,
    `bag_delta(bag, x [n, d])` a rank bucket's deltas (decode steps, one token per row). The adapters read
    LN(h), layer-normalised once for the batch (fp32), or `inputs` as they are (an adapter without LN on
    another stream, e.g. AdaVAE's FFN-parallel one); each distinct adapter reads its weights once per step."""
    source = h if inputs is None else inputs
    ordered = (source if plan.order is None else source.index_select(0, plan.order)).float()
    normed = F.layer_norm(ordered, h.shape[-1:], eps=eps) if inputs is None else ordered
    decoding = h.shape[1] == 1 and bag_delta is not None
    deltas = [bag_delta(piece, normed[piece.rows, 0]).unsqueeze(1) if isinstance(piece, Bag)
              else layer_of(piece[0]).delta(normed[piece[1]])
              for piece in (plan.decode if decoding else plan.groups)]
    delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
    if plan.scale is not None:
        delta = delta * plan.scale[:, None, None]
    delta = delta.to(h.dtype)
    if plan.order is not None:
        return h.index_add(0, plan.order, delta)
    if delta.shape[0] == h.shape[0]:
        return h + delta
    return torch.cat([h[: delta.shape[0]] + delta, h[delta.shape[0]:]])  # rows in order, the last without one


