"""How the store reads an adapter kind's weights file without knowing its tensor keys.

A kind whose export the store must check and may rename on publishing (`hub publish RUN --name OTHER`) registers
a `WeightsFormat`; `hub.adapters.vlm_format` registers the VLM's AdapterHub keys when `hub` is imported. The store
depends on this interface only, never on `hub.adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from hub.errors import HubError

if TYPE_CHECKING:
    import torch

Tensors = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class WeightsFormat:
    """`shape(tensors, name)`: (layers, width) of adapter `name`'s tensors, IntegrityError when malformed;
    `rename(tensors, old, new)`: the tensors with the adapter's name in every key replaced."""

    shape: Callable[[Tensors, str], tuple[int, int]]
    rename: Callable[[Tensors, str, str], Tensors]


_FORMATS: dict[str, WeightsFormat] = {}


def register_weights_format(kind: str, weights_format: WeightsFormat) -> None:
    _FORMATS[kind] = weights_format


def weights_format(kind: str) -> WeightsFormat:
    if kind not in _FORMATS:
        raise HubError(f"no weights format registered for adapter kind {kind!r} (known: {', '.join(sorted(_FORMATS))})")
    return _FORMATS[kind]
