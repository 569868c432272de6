"""The adapter-kind interface: what the engine needs of any kind of adapter, and nothing kind-specific.

This is a kind's implementation; what the rest of the hub knows of it (files, metadata, CLI and HTTP hooks) is its
`hub.adapters.spec.KindSpec`, which names the implementation. A kind (VLM residual adapters, a sentence VAE with
per-row z prefixes) says
  * how its bundle loads from a `LoadedAdapter` (the store-to-engine hand-off) and how many parameters it has;
  * whether it takes text prompts (`text_input_error`) and the task its versions serve under (`task`);
  * how it lives on a backbone (`KindRuntime`): resident bundles in slots, the hooks it installs (removed on
    `close`), and how a batch's rows map to what those hooks apply.
The engine holds one runtime per kind in use. Each forward, every runtime gets a plan built from the batch's
`RowState`s; rows of other kinds (and plain-base rows) carry slot 0, which every kind treats as "leave alone".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from hub.model.hooks import HookSet

if TYPE_CHECKING:
    from hub.store.format import AdapterMeta
    from hub.task import Task

NO_SLOT = 0  # a row this kind leaves alone: the plain base model, or another kind's adapter
# `RowState.extra` keys the decode batch itself reads: one extra key/value per layer ([L, H, 1, d_head] each),
# written into the row's cache before its prompt and visible to every query (a latent slot, e.g. a VAE's z).
PREFIX_KEYS, PREFIX_VALUES = "prefix_keys", "prefix_values"


AVERAGE, STACK = "average", "stack"  # AdapterHub's composition blocks a row may use (`SlotComposition`)


@dataclass(frozen=True)
class SlotComposition:
    """Several resident adapters of one kind on one row, as AdapterHub's composition blocks apply them:
    `average` (`Average(*adapters, weights=weights)`, weights normalised to sum 1) or `stack` (`Stack(*adapters)`,
    each adapter on the previous one's output). Only kinds whose `KindSpec.composable` is set read it."""

    block: str
    slots: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass
class RowState:
    """What one running row needs from its adapter kind: its slot (or a composition of slots), and kind-specific
    tensors (a z vector, extra KV entries) that the kind's runtime fills in and reads; empty for kinds that need
    none."""

    slot: int = NO_SLOT
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    composition: SlotComposition | None = None  # with it, `slot` is the layout adapter's; the kind reads these slots


class AdapterKind(ABC):
    """One kind of adapter: its name in the store's metadata, bundle loading and parameter count."""

    name: str
    text_input_error: str | None = None  # why this kind's adapters take no text prompt (None: they do)

    @abstractmethod
    def load(self, loaded, config) -> Any:
        """The kind's bundle (CPU tensors) from a `hub.store.versions.LoadedAdapter`, checked against the
        backbone's `GPT2Config`; raises HubError when it does not fit."""

    @abstractmethod
    def parameter_count(self, bundle) -> int:
        """Parameters of one bundle (task-token rows not included)."""

    @abstractmethod
    def runtime(self, model: nn.Module, bank_dtype: torch.dtype = torch.float32) -> "KindRuntime":
        """Install this kind on `model` (hooks with handles) and return the live runtime. `bank_dtype`: what
        resident weights are stored in where the kind offers a choice (arithmetic stays float32)."""

    def task(self, meta: "AdapterMeta") -> "Task | None":
        """The task a version of this kind serves under, for a kind whose rows carry their own state instead of
        a task's text layout; None (the default): its `task_type`'s (`hub.adapters.registry.task_for`)."""
        return None


class KindRuntime(ABC):
    """A kind installed on one backbone: resident bundles by slot, and hooks that apply the active plan."""

    def __init__(self, model: nn.Module) -> None:
        self.model: Any = model  # a GPT2LMHeadModel, read through attributes torch does not type
        self.hooks = HookSet()
        self.plan: Any = None  # what the hooks apply during the current forward; None: do nothing
        self.slots: dict[int, Any] = {}  # slot -> the kind's device copy of a bundle

    @abstractmethod
    def add(self, bundle) -> int:
        """Put a bundle on the device; returns its slot (never NO_SLOT)."""

    def claim(self, resident: Any) -> int:
        """Store a device copy in the lowest free slot."""
        slot = next(i for i in range(1, len(self.slots) + 2) if i not in self.slots)
        self.slots[slot] = resident
        return slot

    def remove(self, slot: int) -> None:
        """Free a slot's device memory."""
        if slot not in self.slots:
            raise ValueError(f"slot {slot} is not in use")
        del self.slots[slot]

    @abstractmethod
    def make_plan(self, rows: list[RowState] | None, slot: int = NO_SLOT) -> Any:
        """What the hooks need for a batch: per-row states, or (rows None) `slot` applied to every row
        whatever the batch size. Built once per batch membership, reused every step."""

    @abstractmethod
    def resident_bytes(self) -> int:
        """Device bytes held for resident bundles."""

    @contextmanager
    def active(self, plan: Any) -> Iterator[None]:
        self.plan = plan
        try:
            yield
        finally:
            self.plan = None

    def close(self) -> None:
        """Remove every hook this kind installed; the model is as it was."""
        self.hooks.remove()
