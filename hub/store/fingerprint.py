"""Which backbone an adapter needs: comparing fingerprints, and choosing the backbone for stored adapters.

A fingerprint (`hub.model.backbone.backbone_fingerprint`) is the architecture, the vocabulary size and the sha256
of the weights; ``source`` only says where the weights were read from and is never compared.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from hub.errors import BackboneMismatchError

if TYPE_CHECKING:
    import torch

    from hub.model.backbone import Backbone
    from hub.store.protocol import Store


def describe_backbone(fp: Mapping[str, Any]) -> str:
    sha = str(fp.get("weights_sha256", "?"))[:8]
    return (
        f"'{fp.get('source', '?')}' ({fp.get('model_type', '?')}, {fp.get('n_layer', '?')} layers, "
        f"d={fp.get('n_embd', '?')}, {fp.get('n_head', '?')} heads, vocab {fp.get('vocab_size', '?')}, "
        f"weights {sha}…)"
    )


def fingerprint_mismatch(needed: Mapping[str, Any], loaded: Mapping[str, Any],
                         keys: Iterable[str] | None = None) -> str | None:
    """None when the backbones agree on every key but ``source`` (or on `keys` only), else a message naming both."""
    compared = sorted((set(keys) if keys is not None else needed.keys() | loaded.keys()) - {"source"})
    differing = [k for k in compared if needed.get(k) != loaded.get(k)]
    if not differing:
        return None
    weights = ", so it was trained on other GPT-2 weights" if "weights_sha256" in differing else ""
    return (
        f"needs backbone {describe_backbone(needed)}, "
        f"but the loaded backbone is {describe_backbone(loaded)}; differs in {', '.join(differing)}{weights}"
    )


def check_backbone(needed: Mapping[str, Any], loaded: Mapping[str, Any], what: str, hint: str = "",
                   keys: Iterable[str] | None = None) -> None:
    """BackboneMismatchError ``"{what} needs backbone …, but the loaded backbone is …{hint}"`` unless the
    fingerprints agree (on `keys` only, when given)."""
    problem = fingerprint_mismatch(needed, loaded, keys)
    if problem:
        raise BackboneMismatchError(f"{what} {problem}{hint}")


def backbone_for_adapters(store: Store, refs: Sequence[str], base: str | None, device: str,
                          dtype: torch.dtype | None = None) -> Backbone:
    """The --base given, else HUB_BASE, else the backbone the (first) adapter was trained on, which must then
    match that adapter's recorded fingerprint (hub.json names the path; the weights must be the same)."""
    from hub.model.backbone import load_backbone, resolve_base  # transformers: loaded only when a backbone is

    base = base or os.environ.get("HUB_BASE")
    stored = store.show(refs[0]) if refs and not base else None
    trained_on = dict(stored.meta.backbone) if stored else None
    backbone = load_backbone(resolve_base(base, trained_on), device, dtype=dtype)
    if stored is not None and trained_on is not None:
        check_backbone(trained_on, backbone.fingerprint,
                       f"the backbone named in {stored.ref}'s hub.json is not the one it was trained on: the adapter",
                       hint=". Pass the right one with --base")
    return backbone
