"""Per-request composition: a request names several adapters and one of AdapterHub's blocks, and decodes in the
same fused batch as every other request.

    {"average": [{"task": "a", "weight": 0.7}, {"task": "b", "weight": 0.3}]}  ->  Average("a", "b", weights=…)
    {"stack": ["a", "b"]}                                                        ->  Stack("a", "b")

`Composition` is the request's value (names, plain data, so it travels to Ray replicas); `resolve_composition`
turns it into the resident adapters of one engine, checking what makes a composition meaningful:
  * every adapter is of a composable kind (`KindSpec.composable`: VLM adapters, not sentence VAEs);
  * every adapter's task is of one layout family (`Task.layout_family`): the prompt is laid out once, by the
    `layout` task (the request's `task`/`model`, else the first adapter), with that task's special tokens and
    EOS; the other adapters read those tokens, as they would in a plain `adapters` model holding one embedding
    table (`hub.interop.load_composition`);
  * at most `MAX_ADAPTERS` adapters, each once, and no more than the engine's device slots.
What the blocks compute is `hub.adapters.vlm_compose`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from hub.adapters.base import AVERAGE, STACK
from hub.adapters.registry import kind_spec
from hub.errors import HubError

if TYPE_CHECKING:
    from hub.serving.sequence import ResidentAdapter
    from hub.task import Task

MAX_ADAPTERS = 4
BLOCKS = (AVERAGE, STACK)


@dataclass(frozen=True)
class Composition:
    """AdapterHub's `Average(*tasks, weights=weights)` (weights normalised to sum 1, the library's default) or
    `Stack(*tasks)` (weights all 1); `layout` is the task whose prompt layout and special tokens apply."""

    block: str
    tasks: tuple[str, ...]
    weights: tuple[float, ...]
    layout: str

    @classmethod
    def build(cls, block: str, tasks: Sequence[str], weights: Sequence[float] | None = None,
              layout: str | None = None) -> "Composition":
        """A checked composition; HubError (422) saying what is wrong."""
        if block not in BLOCKS:
            raise HubError(f"a composition is one of {', '.join(BLOCKS)}, not {block!r}")
        tasks = tuple(tasks)
        if not 2 <= len(tasks) <= MAX_ADAPTERS:
            raise HubError(f"a composition takes 2 to {MAX_ADAPTERS} adapters, got {len(tasks)}")
        if len(set(tasks)) != len(tasks):
            raise HubError(f"each adapter may appear once in a composition: {', '.join(tasks)}")
        weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(tasks)
        if len(weights) != len(tasks):
            raise HubError(f"{len(tasks)} adapters need {len(tasks)} weights, got {len(weights)}")
        if block == STACK and any(w != 1.0 for w in weights):
            raise HubError("a stack takes no weights")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise HubError("composition weights must be finite numbers above 0")
        total = sum(weights)
        if not math.isfinite(total):
            raise HubError("composition weights must sum to a finite number")
        if layout is not None and layout not in tasks:
            raise HubError(f"the request's task {layout!r} is not one of the composed adapters "
                           f"({', '.join(tasks)}); name one of them, whose prompt layout applies")
        return cls(block, tasks, tuple(w / total for w in weights) if block == AVERAGE else weights,
                   layout or tasks[0])


@dataclass(frozen=True)
class ComposedAdapters:
    """A composition resolved in one engine: its adapters (in the block's order) and which one lays out the
    prompt (`layout`, one of `members`)."""

    composition: Composition
    members: tuple["ResidentAdapter", ...]
    layout: "ResidentAdapter"

    @property
    def refs(self) -> list[str]:
        return [member.ref for member in self.members]


def check_members(composition: Composition, kinds: Sequence[str], tasks: Sequence["Task"],
                  device_slots: int | None) -> None:
    """What makes a composition of these adapters meaningful (see the module docstring); HubError otherwise."""
    for name, kind in zip(composition.tasks, kinds):
        if not kind_spec(kind).composable:
            raise HubError(f"adapter {name!r} is a {kind} adapter, which cannot be composed")
    families = {task.layout_family for task in tasks}
    if len(families) > 1:
        described = ", ".join(f"{name!r} is {task.type_name}" for name, task in zip(composition.tasks, tasks))
        raise HubError(f"composed adapters must share a prompt layout: {described}")
    if device_slots is not None and len(composition.tasks) > device_slots:
        raise HubError(f"a composition of {len(composition.tasks)} adapters needs as many device slots; this "
                       f"server has {device_slots}")


def resolve_composition(composition: Composition, resolve: Callable[[str], "ResidentAdapter"],
                        device_slots: int | None) -> ComposedAdapters:
    """The adapters serving the composition's tasks now (NotFoundError for an unknown one), checked."""
    members = tuple(resolve(name) for name in composition.tasks)
    check_members(composition, [m.kind for m in members], [m.task for m in members], device_slots)
    layout = members[composition.tasks.index(composition.layout)]
    return ComposedAdapters(composition, members, layout)
