"""The one optimiser and learning-rate schedule of every trainer (VLM adapter, baselines, sentence VAE).

AdamW with VGLM's eps 1e-6 and no weight decay (decay would shrink the task rows); the learning rate rises
linearly over `warmup_steps` (none by default) and then falls linearly to 0 at `total_steps`; every step clips the
gradients to norm 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

CLIP_NORM = 1.0


def linear_schedule(total_steps: int, warmup_steps: int = 0):
    """The lr factor at step s: min((s + 1) / warm-up, (total − s) / (total − warm-up)), at least 0; without a
    warm-up 1 − s / total (at least 0)."""

    def factor(step: int) -> float:
        if warmup_steps <= 0:
            return max(0.0, 1 - step / max(1, total_steps))
        return min((step + 1) / warmup_steps, max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps)))

    return factor


@dataclass
class Optimization:
    """An optimiser, its schedule and the parameters it steps."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR

    @classmethod
    def create(cls, params: Iterable[torch.nn.Parameter], lr: float, total_steps: int,
               warmup_steps: int = 0) -> "Optimization":
        params = list(params)
        optimizer = torch.optim.AdamW(params, lr=lr, eps=1e-6, weight_decay=0.0)
        return cls(params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                                         linear_schedule(total_steps, warmup_steps)))

    def step(self) -> float:
        """Clip, step, advance the schedule and clear the gradients; the learning rate of the next step."""
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.lr

    @property
    def lr(self) -> float:
        return float(self.schedule.get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's `optimizer` and `schedule` entries."""
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
