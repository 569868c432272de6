"""Adapter kinds by name: each kind's `KindSpec` (`hub.adapters.spec`), registered once, consulted by the store
(through `hub.store.kinds`), the engine, the CLI and the server. A stored adapter names its kind in its metadata
(`adapter_kind`, default "vlm"). Light: the kinds' implementations are imported when first asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from hub.adapters.spec import KindSpec
from hub.errors import HubError
from hub.store.kinds import register_stored_kind, unregister_stored_kind

if TYPE_CHECKING:
    from hub.adapters.base import AdapterKind
    from hub.store.format import AdapterMeta
    from hub.task import Task

_SPECS: dict[str, KindSpec] = {}
_IMPLEMENTATIONS: dict[str, "AdapterKind"] = {}


def register(spec: KindSpec) -> KindSpec:
    """Make a kind known to every layer (its stored form to the store)."""
    _SPECS[spec.name] = spec
    _IMPLEMENTATIONS.pop(spec.name, None)
    register_stored_kind(spec.stored)
    return spec


def unregister(name: str) -> None:
    _SPECS.pop(name, None)
    _IMPLEMENTATIONS.pop(name, None)
    unregister_stored_kind(name)


def find_kind(name: str) -> KindSpec | None:
    return _SPECS.get(name)


def kind_spec(name: str) -> KindSpec:
    if name not in _SPECS:
        raise HubError(f"unknown adapter kind {name!r}; known: {', '.join(sorted(_SPECS))}")
    return _SPECS[name]


def kind_specs() -> list[KindSpec]:
    """Every registered kind, by name."""
    return [_SPECS[name] for name in sorted(_SPECS)]


def get_kind(name: str) -> "AdapterKind":
    """The kind's implementation (imported and made on first use)."""
    if name not in _IMPLEMENTATIONS:
        _IMPLEMENTATIONS[name] = kind_spec(name).load_implementation()
    return _IMPLEMENTATIONS[name]


def task_for(meta: "AdapterMeta", make_task: Callable[[str, dict], "Task"]) -> "Task":
    """The task a stored version serves under: its kind's own (a kind without a text layout), else its
    `task_type`'s from the injected task factory."""
    return get_kind(meta.adapter_kind).task(meta) or make_task(meta.task_type, dict(meta.task_config))


def _register_builtin() -> None:
    from hub.adapters import vae_kind, vlm_format

    register(vlm_format.SPEC)
    register(vae_kind.SPEC)


_register_builtin()
