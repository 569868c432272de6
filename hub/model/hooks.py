"""Forward hooks with handles (as PEFT attaches its layers): whatever is installed on the model comes off again.

An `Engine` or a training-only regulariser adds its hooks through one `HookSet`; `remove()` takes every one of them
off, so a model used by several engines in turn never stacks hooks.
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle

ForwardHook = Callable[[nn.Module, tuple, object], object]


class HookSet:
    """Forward hooks registered by one owner, removable together."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def add(self, module: nn.Module, hook: ForwardHook) -> None:
        self.handles.append(module.register_forward_hook(hook))

    def add_pre(self, module: nn.Module, hook: Callable[[nn.Module, tuple], object]) -> None:
        """A forward pre-hook (it sees, and may replace, the module's inputs)."""
        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
