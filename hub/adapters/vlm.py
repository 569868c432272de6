"""The VLM residual adapter: its `adapters`-library config, its formula, and the fused per-row form.

One adapter per GPT-2 block, on the block output (after the FFN residual add):

    A(h) = h + W_up · ReLU(W_down · LN_a(h) + b_d) + b_u

Training builds it with AdapterHub `adapters` (`vlm_adapter_config`); serving (`VlmRuntime`) applies the same
formula with rows grouped by adapter: each step reads each distinct adapter's weights once, at that adapter's
own bottleneck (nothing is padded to the largest rank in use), and rows of one batch may use different
adapters. Tests prove the library, the formula and the grouped path give the same logits.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

import torch
import torch.nn.functional as F
from adapters import SeqBnConfig
from torch import nn

from hub.adapters.base import NO_SLOT, AdapterKind, KindRuntime, RowState
from hub.adapters.rank_buckets import Location, RankBucket
from hub.adapters.vlm_compose import ComposedPlan, apply_composed, compose_plan
from hub.adapters.vlm_format import VLM, adapter_layers
from hub.adapters.vlm_plan import VlmPlan, add_deltas, group_rows
from hub.errors import HubError
from hub.model.hooks import HookSet


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
    """Per-layer tensors in `nn.Linear` layout (as `hub.adapters.vlm_format.adapter_layers` returns) -> [L, ...]
    weights."""
    def stack(key: str, transpose: bool = False) -> torch.Tensor:
        return torch.stack([layer[key].t() if transpose else layer[key] for layer in layers])

    return AdapterWeights(
        ln_weight=stack("ln_weight"),
        ln_bias=stack("ln_bias"),
        down_weight=stack("down_weight", transpose=True),
        down_bias=stack("down_bias"),
        up_weight=stack("up_weight", transpose=True),
        up_bias=stack("up_bias"),
    )


@dataclass(frozen=True)
class LayerWeights:
    """One adapter at one layer, ready for `F.linear` on layer-normalised input (`nn.Linear` layout).

    The LN affine is folded into the down projection: W_down·(γ⊙x̂ + β) + b_d = (W_down·diag γ)·x̂ + (W_down·β + b_d),
    so a batch normalises its rows once per layer and each adapter adds two `F.linear` calls. down [r, d], up [d, r].
    """

    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor

    @classmethod
    def from_adapter(cls, w: AdapterWeights, layer: int, device: torch.device) -> "LayerWeights":
        def put(t: torch.Tensor) -> torch.Tensor:
            return t[layer].to(device=device, dtype=torch.float32)

        down = put(w.down_weight).t()  # [r, d]
        return cls((down * put(w.ln_weight)).contiguous(), down @ put(w.ln_bias) + put(w.down_bias),
                   put(w.up_weight).t().contiguous(), put(w.up_bias).contiguous())

    def delta(self, normed: torch.Tensor) -> torch.Tensor:
        """A(h) - h from LN(h) without affine (fp32)."""
        return F.linear(torch.relu_(F.linear(normed, self.down, self.down_bias)), self.up, self.up_bias)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


class VlmRuntime(KindRuntime):
    """Resident VLM adapters in rank buckets (`hub.adapters.rank_buckets`) and one hook per GPT-2 block.

    Memory is the resident adapters' own weights (less the folded LN vectors; in `bank_dtype`, float32 unless
    asked otherwise) plus at most a fifth of free room per bucket: no slot is padded to another adapter's rank.
    Per step and layer the batch is normalised once; in a decode step each rank bucket applies all its rows'
    adapters in one `F.embedding_bag` pair (each adapter's weights read once per row), and an adapter with many
    rows (or any adapter during prefill) runs as two `F.linear` calls over its own rows; rows without a VLM
    adapter pass unchanged. Rows may compose several adapters (`hub.adapters.vlm_compose`); while a plan with
    averaged rows is active, a hook on each block's FFN keeps its output for the block's hook.
    """

    def __init__(self, model: nn.Module, bank_dtype: torch.dtype = torch.float32):
        super().__init__(model)
        self.eps = self.model.config.layer_norm_epsilon
        self.device = next(model.parameters()).device
        self.bank_dtype = bank_dtype
        self.buckets: dict[int, RankBucket] = {}
        self.ffn_output: dict[int, torch.Tensor] = {}  # layer -> its FFN output in this forward (averaged rows)
        for layer, block in enumerate(self.model.transformer.h):
            self.hooks.add(block, self._hook(layer))

    def add(self, bundle: AdapterWeights) -> int:
        layers = device_layers(bundle, self.device)
        rank = layers[0].down.shape[0]
        if rank not in self.buckets:
            self.buckets[rank] = RankBucket(rank, len(layers), layers[0].down.shape[1], self.device,
                                            self.bank_dtype)
        return self.claim(Location(rank, self.buckets[rank].put(layers)))

    def remove(self, slot: int) -> None:
        if slot in self.slots:
            location: Location = self.slots[slot]
            self.buckets[location.rank].release(location.index)
        super().remove(slot)

    def layer_weights(self, slot: int, layer: int) -> LayerWeights:
        location: Location = self.slots[slot]
        return LayerWeights(*self.buckets[location.rank].layer_views(location.index, layer))

    def resident_bytes(self) -> int:
        return sum(bucket.nbytes() for bucket in self.buckets.values())

    def make_plan(self, rows: list[RowState] | None, slot: int = NO_SLOT) -> VlmPlan | ComposedPlan:
        if rows is not None and any(row.composition is not None for row in rows):
            return compose_plan(rows, self.device, self.slots, self.buckets)
        return group_rows(rows, slot, self.device, self.slots, self.buckets)

    @contextmanager
    def active(self, plan: VlmPlan | ComposedPlan) -> Iterator[None]:
        """The plan for the forwards within the block; a plan with averaged rows also keeps each block's FFN
        output meanwhile (hooks on the FFNs, there only while such a plan is active)."""
        if not (isinstance(plan, ComposedPlan) and plan.averaged is not None):
            with super().active(plan):
                yield
            return
        ffn_hooks = HookSet()
        try:
            for layer, block in enumerate(self.model.transformer.h):
                ffn_hooks.add(block.mlp, self._keep_ffn(layer))
            with super().active(plan):
                yield
        finally:
            ffn_hooks.remove()
            self.ffn_output.clear()

    def _keep_ffn(self, layer: int):
        def keep(module, args, output):
            self.ffn_output[layer] = output

        return keep

    def _hook(self, layer: int):
        def apply_stage(h: torch.Tensor, plan: VlmPlan) -> torch.Tensor:
            return add_deltas(h, plan, lambda slot: self.layer_weights(slot, layer), self.eps,
                              lambda bag, x: self.buckets[bag.rank].bag_delta(x, layer, bag))

        def apply(module, args, output):
            plan: VlmPlan | ComposedPlan | None = self.plan
            if isinstance(plan, ComposedPlan):
                h = apply_composed(output[0], plan, self.ffn_output.pop(layer, None), apply_stage)
            elif plan and plan.groups:
                h = apply_stage(output[0], plan)
            else:
                return output
            return (h,) + tuple(output[1:])

        return apply


def device_layers(bundle: AdapterWeights, device: torch.device) -> list[LayerWeights]:
    """An adapter's weights per layer on `device`, ready for `LayerWeights.delta`."""
    return [LayerWeights.from_adapter(bundle, layer, device) for layer in range(bundle.ln_weight.shape[0])]


class VlmKind(AdapterKind):
    """VLM residual adapters in AdapterHub's SeqBn format (`adapter.safetensors`)."""

    name = VLM

    def load(self, loaded, config) -> AdapterWeights:
        weights = stack_layers(adapter_layers(loaded.adapter_tensors, loaded.name))
        layers, d = weights.ln_weight.shape
        if (layers, d) != (config.n_layer, config.n_embd):
            raise HubError(f"adapter {loaded.ref} has {layers} layers of d={d}; "
                           f"the backbone has {config.n_layer} layers of d={config.n_embd}")
        return weights

    def parameter_count(self, bundle: AdapterWeights) -> int:
        return sum(getattr(bundle, f.name).numel() for f in fields(AdapterWeights))

    def runtime(self, model: nn.Module, bank_dtype: torch.dtype = torch.float32) -> VlmRuntime:
        return VlmRuntime(model, bank_dtype)
