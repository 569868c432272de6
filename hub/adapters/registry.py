"""Adapter kinds by name. A stored adapter names its kind in its metadata (`adapter_kind`, default "vlm")."""

from __future__ import annotations

from hub.adapters.base import AdapterKind
from hub.errors import HubError

_KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _KINDS.pop(name, None)


def get_kind(name: str) -> AdapterKind:
    if name not in _KINDS:
        raise HubError(f"unknown adapter kind {name!r}; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def _register_builtin() -> None:
    from hub.adapters.vae import VaeKind
    from hub.adapters.vlm import VlmKind

    register(VlmKind())
    register(VaeKind())


_register_builtin()
