"""The VLM adapter kind as the hub sees it (`SPEC`), and its weights file: AdapterHub's tensor keys, grouped per
layer, checked and renamed.

``transformer.h.<layer>.output_adapters.adapters.<name>.<part>`` for the parts of `LAYER_PARTS`; plain
`adapters.load_adapter` reads the same file. Free of torch: registered (`hub.adapters.registry`) when `hub` is
imported; the implementation is `hub.adapters.vlm.VlmKind`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from hub.adapters.spec import KindSpec
from hub.errors import IntegrityError
from hub.store.format import DEFAULT_KIND
from hub.store.kinds import StoredKind, Tensors, WeightsFormat
from hub.store.layout import ADAPTER_WEIGHTS, PAYLOAD_FILES

if TYPE_CHECKING:
    import torch

VLM = DEFAULT_KIND  # the store's default kind (metadata written before `adapter_kind` existed) is this one
LAYER_PARTS = {
    "adapter_down.0.weight": "ln_weight",
    "adapter_down.0.bias": "ln_bias",
    "adapter_down.1.weight": "down_weight",
    "adapter_down.1.bias": "down_bias",
    "adapter_up.weight": "up_weight",
    "adapter_up.bias": "up_bias",
}


def adapter_layers(tensors: Tensors, name: str) -> list[dict[str, torch.Tensor]]:
    """Group AdapterHub keys of adapter ``name`` per layer: ln/down/up weights and biases.

    Raises IntegrityError on foreign keys, missing layers or parts, or inconsistent shapes.
    """
    layers = _group_layers(tensors, name)
    result = [layers[i] for i in range(len(layers))]
    for i, layer in enumerate(result):
        missing = sorted(set(LAYER_PARTS.values()) - layer.keys())
        if missing:
            raise IntegrityError(f"{ADAPTER_WEIGHTS} of adapter '{name}', layer {i}: missing {', '.join(missing)}")
    _check_layer_shapes(result, name)
    return result


def _group_layers(tensors: Tensors, name: str) -> dict[int, dict[str, torch.Tensor]]:
    pattern = re.compile(rf"transformer\.h\.(\d+)\.output_adapters\.adapters\.{re.escape(name)}\.(.+)")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key)
        if not match or match.group(2) not in LAYER_PARTS:
            raise IntegrityError(f"unexpected tensor {key!r} in {ADAPTER_WEIGHTS} of adapter '{name}'")
        layers.setdefault(int(match.group(1)), {})[LAYER_PARTS[match.group(2)]] = tensor
    if not layers:
        raise IntegrityError(f"{ADAPTER_WEIGHTS} holds no layers of adapter '{name}'")
    if sorted(layers) != list(range(len(layers))):
        raise IntegrityError(f"{ADAPTER_WEIGHTS} of adapter '{name}' has layers {sorted(layers)}, expected 0..n-1")
    return layers


def _check_layer_shapes(layers: list[dict[str, torch.Tensor]], name: str) -> None:
    d, b = layers[0]["ln_weight"].shape[0], layers[0]["down_bias"].shape[0]
    expected = {
        "ln_weight": (d,), "ln_bias": (d,), "down_weight": (b, d),
        "down_bias": (b,), "up_weight": (d, b), "up_bias": (d,),
    }
    for i, layer in enumerate(layers):
        for part, shape in expected.items():
            if tuple(layer[part].shape) != shape:
                raise IntegrityError(
                    f"{ADAPTER_WEIGHTS} of adapter '{name}', layer {i}: {part} has shape "
                    f"{tuple(layer[part].shape)}, expected {shape}"
                )


def layers_and_width(tensors: Tensors, name: str) -> tuple[int, int]:
    """How many layers adapter `name` has, and their width d."""
    layers = adapter_layers(tensors, name)
    return len(layers), int(layers[0]["ln_weight"].shape[0])


def renamed(tensors: Tensors, old: str, new: str) -> Tensors:
    """The same tensors as adapter `new` (AdapterHub names the adapter in every key)."""
    before, after = f".adapters.{old}.", f".adapters.{new}."
    return {key.replace(before, after): value for key, value in tensors.items()}


SPEC = KindSpec(
    stored=StoredKind(VLM, PAYLOAD_FILES, ADAPTER_WEIGHTS, weights_format=WeightsFormat(layers_and_width, renamed)),
    implementation="hub.adapters.vlm:VlmKind",
    description="VLM residual adapters with their task's special tokens (hub train TASK_TYPE)",
    composable=True,  # AdapterHub's Average and Stack per request (hub.adapters.vlm_compose)
)
