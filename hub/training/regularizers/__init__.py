"""Training-only regularisers: modules that act on the model while it trains and are gone afterwards.

A regulariser hooks the model for the duration of `Trainer.train` (handles, removed in a `finally`), may add
parameters that the task loss trains with the method's own ones, may warm up before the first step and may
take its own optimiser step after each task step. Its modules are never registered in the model, so nothing of
it reaches a checkpoint's model weights or an export; its resolved settings are recorded in the run config
(`TrainConfig.regularizers`, the `training` section of the export's metadata). Serving knows nothing of them.

Registered by name in `REGULARIZERS`; `hub train --mvcr ...` builds `{"mvcr": {...}}`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Callable, ClassVar, Iterable

import torch

from hub.errors import HubError

# What a warm-up may ask of the trainer: one pass over the training batches, each run through the model in
# the mode given (no gradients), so that the regulariser's hooks can see the activations.
ForwardBatches = Callable[[], Iterable[None]]
# Averages parameters' gradients over data-parallel processes (a no-op in one process).
GradientSync = Callable[[list[torch.nn.Parameter]], None]


class Regularizer(ABC):
    """Built as `cls(settings, model, seed, average_gradients)`; a regulariser that steps its own optimiser on
    each process's data calls `average_gradients` first, so its modules stay equal on every process."""

    name: ClassVar[str]

    def __init__(self, settings: dict[str, Any], model: torch.nn.Module, seed: int,
                 average_gradients: GradientSync = lambda params: None):
        """`settings` as `resolve` completed them, for `model` (whose device it uses); `seed` its own randomness."""
        self.settings = settings
        self.average_gradients = average_gradients

    @classmethod
    @abstractmethod
    def resolve(cls, options: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
        """Complete, validated settings (defaults filled in for this model); a clear `HubError` when invalid."""

    @abstractmethod
    def parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the task loss trains too (in the method's optimiser)."""

    @abstractmethod
    def attached(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        """Hook `model` while training inside the `with`; every hook is removed on leaving it."""

    def warm_up(self, forward_batches: ForwardBatches, task_steps: int) -> None:
        """Before the first task step (not on resume); `task_steps` is the run's number of optimiser steps."""

    def after_step(self) -> dict[str, float]:
        """After each task optimiser step; what it returns is logged with the step."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def regularizer_types() -> dict[str, type[Regularizer]]:
    from hub.training.regularizers.mvcr import MVCR

    return {cls.name: cls for cls in (MVCR,)}


def resolve_regularizers(specs: dict[str, dict], model: torch.nn.Module) -> dict[str, dict]:
    """`{name: options}` -> `{name: complete settings}` for this model."""
    types = regularizer_types()
    unknown = sorted(set(specs) - set(types))
    if unknown:
        raise HubError(f"unknown regulariser(s) {unknown}; available: {', '.join(sorted(types))}")
    return {name: types[name].resolve(options, model) for name, options in specs.items()}


def build_regularizers(settings: dict[str, dict], model: torch.nn.Module, seed: int,
                       average_gradients: GradientSync = lambda params: None) -> list[Regularizer]:
    """One regulariser per entry of resolved `settings`, on the model's device. `average_gradients(params)`
    averages gradients over data-parallel processes before a regulariser's own optimiser steps."""
    types = regularizer_types()
    return [types[name](options, model, seed, average_gradients) for name, options in settings.items()]
