"""The dtype names the hub accepts (`--dtype`, `--bank-dtype`, `RayServeOptions.dtype`); no torch import here, so
the CLI can offer them as choices without loading torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

AUTO = "auto"  # the backbone: float32 on the CPU, bfloat16 (else float16) on a GPU (`backbone.default_dtype`)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
BACKBONE_DTYPES = (AUTO, *DTYPE_NAMES)


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype named (None for `auto`: the device's default)."""
    import torch

    return None if name == AUTO else getattr(torch, name)
