"""The VLM bank: resident adapters in one table per bottleneck size (a rank bucket) and layer.

Per rank r and layer l the bucket holds

    down [cap·d, r]   rows s·d … s·d+d-1: adapter s's (W_down·diag γ)ᵀ  (LN affine folded in: `LayerWeights`)
    up   [cap·r, d]   rows s·r … s·r+r-1: adapter s's W_upᵀ
    down_bias [cap, r], up_bias [cap, d]

so an adapter is one index in its rank's tables and never pays for another rank's size. A decode step applies
every adapter of one rank, each row its own, in one `F.embedding_bag` pair per layer: with the row's normalised
input x as the per-sample weights, Σ_i x[i]·down[s·d + i] = (W_down·diag γ)·x reads adapter s's weights once per
row, with no per-row copy of them; likewise for the up projection. The same tables give each adapter's
`LayerWeights` as views for dense matmuls over many rows (prefill, or an adapter with many rows).

The tables may be stored in float16 or bfloat16 (`hub serve --bank-dtype`): half the bytes a decode step reads;
inputs are rounded to the table's dtype and the results widened back to float32.

Capacity grows by a fifth (at least one index) when a bucket is full, layer by layer, so the transient extra
memory is one layer's table and the bank stays within 1.2× its high-water mark; freed indices are reused lowest
first.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROWTH = 1.2


@dataclass(frozen=True)
class Location:
    """Where a resident adapter's weights are: its rank bucket and its index there."""

    rank: int
    index: int


@dataclass(frozen=True)
class Bag:
    """Rows (a slice of the plan's order, one token each) applied through one rank bucket: their indices
    there and the `F.embedding_bag` ids of their down [n, d] and up [n, r] rows."""

    rank: int
    rows: slice
    index: torch.Tensor
    down_ids: torch.Tensor
    up_ids: torch.Tensor


class RankBucket:
    """Every resident adapter of one bottleneck size r, per layer in `down`, `up`, `down_bias`, `up_bias`."""

    def __init__(self, rank: int, n_layer: int, d: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.rank, self.d, self.capacity = rank, d, 0

        def zeros(*shape: int) -> list[torch.Tensor]:
            return [torch.zeros(*shape, device=device, dtype=dtype) for _ in range(n_layer)]

        self.down, self.up = zeros(0, rank), zeros(0, d)
        self.down_bias, self.up_bias = zeros(0, rank), zeros(0, d)
        self.free: list[int] = []  # a heap of unused indices

    def put(self, layers: list) -> int:
        """Store one adapter (`LayerWeights` per layer, down [r, d], up [d, r]); returns its index."""
        if not self.free:
            self._grow()
        index = heapq.heappop(self.free)
        d, r = self.d, self.rank
        for layer, weights in enumerate(layers):
            self.down[layer][index * d : (index + 1) * d] = weights.down.t()
            self.up[layer][index * r : (index + 1) * r] = weights.up.t()
            self.down_bias[layer][index] = weights.down_bias
            self.up_bias[layer][index] = weights.up_bias
        return index

    def release(self, index: int) -> None:
        heapq.heappush(self.free, index)

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def _grow(self) -> None:
        capacity = max(self.capacity + 1, math.ceil(self.capacity * GROWTH))
        for tables, width in ((self.down, self.d), (self.up, self.rank), (self.down_bias, 1), (self.up_bias, 1)):
            for layer, old in enumerate(tables):
                grown = old.new_zeros(capacity * width, old.shape[1])
                grown[: old.shape[0]] = old
                tables[layer] = grown  # the old layer table is freed before the next is allocated
        for index in range(self.capacity, capacity):
            heapq.heappush(self.free, index)
        self.capacity = capacity

    def layer_views(self, index: int, layer: int) -> tuple[torch.Tensor, ...]:
        """(down [r, d], down_bias [r], up [d, r], up_bias [d]) of one adapter in float32: views of a float32
        bank, no copy (a float16/bfloat16 bank is widened: dense matmuls run in float32)."""
        d, r = self.d, self.rank
        views = (self.down[layer][index * d : (index + 1) * d].t(), self.down_bias[layer][index],
                 self.up[layer][index * r : (index + 1) * r].t(), self.up_bias[layer][index])
        return tuple(view.float() for view in views)

    def bag(self, rows: slice, indices: list[int]) -> Bag:
        """The plan entry for `rows` whose adapters sit at `indices` of this bucket."""
        device = self.up[0].device
        index = torch.tensor(indices, device=device)
        return Bag(self.rank, rows, index, index[:, None] * self.d + torch.arange(self.d, device=device),
                   index[:, None] * self.rank + torch.arange(self.rank, device=device))

    def bag_delta(self, normed: torch.Tensor, layer: int, bag: Bag) -> torch.Tensor:
        """A(h) - h for rows x [n, d] (layer-normalised, no affine), row i through adapter `bag.index[i]`."""
        down, up = self.down[layer], self.up[layer]
        z = F.embedding_bag(bag.down_ids, down, per_sample_weights=normed.to(down.dtype), mode="sum").float()
        z = torch.relu_(z + self.down_bias[layer].index_select(0, bag.index).float())
        delta = F.embedding_bag(bag.up_ids, up, per_sample_weights=z.to(up.dtype), mode="sum").float()
        return delta + self.up_bias[layer].index_select(0, bag.index).float()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for tables in (self.down, self.up, self.down_bias, self.up_bias)
                   for t in tables)
