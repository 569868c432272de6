"""What the store knows of an adapter kind: its files, whether it has task tokens, its metadata and weights checks.

Each kind registers a `StoredKind` (through `hub.adapters.registry.register`, which the composition root
`hub/__init__.py` calls for the built-in kinds); `AdapterMeta` validation, `hub.store.layout` and the export reader
consult it by the `adapter_kind` a version's metadata names. The store depends on this interface only, never on
`hub.adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from hub.errors import HubError, IntegrityError

if TYPE_CHECKING:
    import torch

Tensors = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class WeightsFormat:
    """`shape(tensors, name)`: (layers, width) of adapter `name`'s tensors, IntegrityError when malformed;
    `rename(tensors, old, new)`: the tensors with the adapter's name in every key replaced."""

    shape: Callable[[Tensors, str], tuple[int, int]]
    rename: Callable[[Tensors, str, str], Tensors]


def no_problems(data: dict[str, Any]) -> list[str]:
    return []


@dataclass(frozen=True)
class StoredKind:
    """One adapter kind as stored. `payload_files`: what a version holds besides hub.json (each checksummed);
    `weights_file`: the one `LoadedAdapter.adapter_tensors` come from; `has_task_tokens`: whether the bundle
    holds task-token rows (`task_tokens.safetensors`) and the metadata its special tokens; `required_fields`:
    metadata fields this kind needs beyond the common ones; `meta_problems(data)`: its own checks of the parsed
    metadata, as short phrases; `weights_format`: how the export reader checks (and renames) its tensor keys,
    for kinds whose weights name the adapter (None: shapes are checked on loading)."""

    name: str
    payload_files: tuple[str, ...]
    weights_file: str
    has_task_tokens: bool = True
    required_fields: tuple[str, ...] = ()
    meta_problems: Callable[[dict[str, Any]], list[str]] = no_problems
    weights_format: WeightsFormat | None = None


_KINDS: dict[str, StoredKind] = {}


def register_stored_kind(kind: StoredKind) -> None:
    _KINDS[kind.name] = kind


def unregister_stored_kind(name: str) -> None:
    _KINDS.pop(name, None)


def stored_kind(name: str) -> StoredKind:
    """The kind named `name`; IntegrityError (a version the store skips, with the reason) when none is registered."""
    if name not in _KINDS:
        raise IntegrityError(f"unknown adapter kind {name!r} (known: {', '.join(sorted(_KINDS))})")
    return _KINDS[name]


def weights_format(name: str) -> WeightsFormat:
    kind = stored_kind(name)
    if kind.weights_format is None:
        raise HubError(f"adapter kind {name!r} has no weights format: its tensor keys are not checked by name")
    return kind.weights_format
