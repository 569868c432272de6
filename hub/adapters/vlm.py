"""The VLM residual adapter: its `adapters`-library config, its formula, and the fused per-row form.

One adapter per GPT-2 block, on the block output (after the FFN residual add):

    A(h) = h + W_up · ReLU(W_down · LN_a(h) + b_d) + b_u

Training builds it with AdapterHub `adapters` (`vlm_adapter_config`); serving applies `vlm_adapter` with
weights gathered per row from an `AdapterBank`, so rows of one batch may use different adapters. A test
proves both give the same logits.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

import torch
import torch.nn.functional as F
from adapters import SeqBnConfig

from hub.errors import HubError


def vlm_adapter_config(hidden_size: int, bottleneck: int) -> SeqBnConfig:
    """SeqBnConfig equal to the VLM adapter.

    `adapters` computes the bottleneck as `int(d // reduction_factor)`, which truncates d/b for many
    (d, b) pairs (768/300 -> 299), so the factor is nudged just below d/b.
    """
    if not 1 <= bottleneck <= 4 * hidden_size:
        raise HubError(f"bottleneck must be between 1 and {4 * hidden_size} for d={hidden_size}, not {bottleneck}")
    factor = math.nextafter(hidden_size / bottleneck, 0.0)
    assert int(hidden_size // factor) == bottleneck
    return SeqBnConfig(reduction_factor=factor, non_linearity="relu", ln_before=True, residual_before_ln=True)


def adapter_parameter_count(n_layer: int, hidden_size: int, bottleneck: int) -> int:
    """L·(3d + 2db + b): LN γ, β (2d), W_down (db), b_d (b), W_up (bd), b_u (d) per block."""
    return n_layer * (3 * hidden_size + 2 * hidden_size * bottleneck + bottleneck)


@dataclass
class AdapterWeights:
    """Weights of adapters at one or all layers.

    Shapes end in (d,), (d,), (d, r), (r,), (r, d), (d,). Leading dims are free: none for one adapter at one
    layer, [B] for per-row weights, [S, L] in a bank.
    """

    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    down_weight: torch.Tensor
    down_bias: torch.Tensor
    up_weight: torch.Tensor
    up_bias: torch.Tensor

    def map(self, fn) -> "AdapterWeights":
        return AdapterWeights(*(fn(getattr(self, f.name)) for f in fields(self)))


def vlm_adapter(h: torch.Tensor, w: AdapterWeights, eps: float) -> torch.Tensor:
    """A(h) for h [B, T, d]; weights shared (no leading dim) or per row (leading dim B)."""
    per_row = w.ln_weight.dim() == 2
    lift = (lambda t: t.unsqueeze(1)) if per_row else (lambda t: t)  # vectors -> [B, 1, n] to broadcast over T
    x = F.layer_norm(h, h.shape[-1:], eps=eps) * lift(w.ln_weight) + lift(w.ln_bias)
    z = torch.relu(torch.matmul(x, w.down_weight) + lift(w.down_bias))
    return h + torch.matmul(z, w.up_weight) + lift(w.up_bias)


def stack_layers(layers: list[dict[str, torch.Tensor]]) -> AdapterWeights:
    """Per-layer tensors in `nn.Linear` layout (as `hub.store.catalog.adapter_layers` returns) -> [L, ...] weights."""
    stack = lambda key, transpose=False: torch.stack([l[key].t() if transpose else l[key] for l in layers])  # noqa: E731
    return AdapterWeights(
        ln_weight=stack("ln_weight"),
        ln_bias=stack("ln_bias"),
        down_weight=stack("down_weight", transpose=True),
        down_bias=stack("down_bias"),
        up_weight=stack("up_weight", transpose=True),
        up_bias=stack("up_bias"),
    )


def identity_weights(n_layer: int, hidden_size: int, rank: int, **like) -> AdapterWeights:
    """Slot 0: W_up = 0 and b_u = 0 make A(h) = h exactly."""
    zeros = lambda *shape: torch.zeros(*shape, **like)  # noqa: E731
    return AdapterWeights(
        ln_weight=torch.ones(n_layer, hidden_size, **like),
        ln_bias=zeros(n_layer, hidden_size),
        down_weight=zeros(n_layer, hidden_size, rank),
        down_bias=zeros(n_layer, rank),
        up_weight=zeros(n_layer, rank, hidden_size),
        up_bias=zeros(n_layer, hidden_size),
    )


def pad_rank(w: AdapterWeights, rank: int) -> AdapterWeights:
    """Zero-pad the bottleneck to `rank`: exact for ReLU (zero columns give ReLU(0) = 0, zero rows add 0)."""
    extra = rank - w.down_bias.shape[-1]
    if extra < 0:
        raise ValueError("cannot shrink an adapter's bottleneck")
    return AdapterWeights(
        ln_weight=w.ln_weight,
        ln_bias=w.ln_bias,
        down_weight=F.pad(w.down_weight, (0, extra)),
        down_bias=F.pad(w.down_bias, (0, extra)),
        up_weight=F.pad(w.up_weight, (0, 0, 0, extra)),
        up_bias=w.up_bias,
    )


class AdapterBank:
    """Slots of stacked adapter weights, [S, L, ...]; slot 0 is the identity (plain base model).

    Bottlenecks smaller than the bank's rank are zero-padded; the bank grows its rank and capacity as needed.
    """

    def __init__(self, n_layer: int, hidden_size: int, device: torch.device, dtype: torch.dtype, capacity: int = 8):
        self.n_layer, self.hidden_size = n_layer, hidden_size
        self.like = {"device": device, "dtype": dtype}
        self.rank = 1
        self.weights = identity_weights(n_layer, hidden_size, self.rank, **self.like).map(
            lambda t: t.unsqueeze(0).repeat(capacity, *([1] * t.dim()))
        )
        self.free = list(range(1, capacity))

    @property
    def capacity(self) -> int:
        return self.weights.ln_weight.shape[0]

    def _grow(self, rank: int, capacity: int) -> None:
        old_capacity = self.capacity
        weights = pad_rank(self.weights, rank)
        extra = identity_weights(self.n_layer, self.hidden_size, rank, **self.like).map(
            lambda t: t.unsqueeze(0).repeat(capacity - old_capacity, *([1] * t.dim()))
        )
        self.weights = AdapterWeights(
            *(torch.cat([getattr(weights, f.name), getattr(extra, f.name)]) for f in fields(AdapterWeights))
        )
        self.free.extend(range(old_capacity, capacity))
        self.rank = rank

    def add(self, layers: AdapterWeights) -> int:
        """Copy an adapter ([L, ...] weights) into a free slot and return the slot id."""
        rank = max(self.rank, layers.down_bias.shape[-1])
        if rank > self.rank or not self.free:
            self._grow(rank, self.capacity * 2 if not self.free else self.capacity)
        slot = self.free.pop(0)
        padded = pad_rank(layers.map(lambda t: t.to(**self.like)), self.rank)
        for f in fields(AdapterWeights):
            getattr(self.weights, f.name)[slot].copy_(getattr(padded, f.name))
        return slot

    def remove(self, slot: int) -> None:
        """Reset a slot to the identity and make it free again."""
        if slot == 0 or slot in self.free:
            raise ValueError(f"slot {slot} is not in use")
        identity = identity_weights(self.n_layer, self.hidden_size, self.rank, **self.like)
        for f in fields(AdapterWeights):
            getattr(self.weights, f.name)[slot].copy_(getattr(identity, f.name))
        self.free.append(slot)
        self.free.sort()

    def gather(self, slot_ids: torch.Tensor) -> AdapterWeights:
        """Per-row weights [B, L, ...]: one index op per bank tensor for the whole model."""
        return self.weights.map(lambda t: t.index_select(0, slot_ids))


class FusedAdapterHooks:
    """Forward hooks that apply per-row adapters at every GPT-2 block output of a plain `GPT2LMHeadModel`."""

    def __init__(self, model: torch.nn.Module, bank: AdapterBank):
        self.bank = bank
        self.eps = model.config.layer_norm_epsilon
        self.rows: AdapterWeights | None = None
        for i, block in enumerate(model.transformer.h):
            block.register_forward_hook(self._hook(i))

    def _hook(self, layer: int):
        def apply(module, args, output):
            if self.rows is None:
                return output
            w = self.rows.map(lambda t: t[:, layer])
            return (vlm_adapter(output[0], w, self.eps),) + tuple(output[1:])

        return apply

    @contextmanager
    def active(self, slot_ids: torch.Tensor) -> Iterator[None]:
        """Within the block, row b of every forward uses the adapter in slot `slot_ids[b]`."""
        self.rows = self.bank.gather(slot_ids)
        try:
            yield
        finally:
            self.rows = None
