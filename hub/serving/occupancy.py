"""What the runner holds right now, as a load balancer reads it (the Kubernetes inference gateway's Model Server
Protocol, under vLLM's metric names in `server.prometheus`): adapters of running and waiting requests, the KV
budget in use (where each adapter's weights are: `AdapterManager.tiers`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hub.serving.manager import AdapterManager
from hub.serving.sequence import Sequence


@dataclass
class Occupancy:
    running_adapters: list[str] = field(default_factory=list)  # sorted, each once
    waiting_adapters: list[str] = field(default_factory=list)
    max_adapters: int = 0  # adapters that can be resident on the device at once (unbounded: every known one)
    kv_tokens: int = 0  # tokens held in the running batch's KV cache (prompts and outputs)
    kv_budget: int = 0  # tokens the batch may hold: max_batch rows of the model's context

    @property
    def kv_usage(self) -> float:
        return min(1.0, self.kv_tokens / self.kv_budget) if self.kv_budget else 0.0


def occupancy(running: list[Sequence], waiting: list[Sequence], manager: AdapterManager, max_batch: int,
              context: int) -> Occupancy:
    def names(sequences: list[Sequence]) -> list[str]:
        return sorted({s.adapter.name for s in sequences if s.adapter is not None})

    return Occupancy(names(running), names(waiting), manager.settings.max_resident or len(manager.known()),
                     sum(len(s.prompt_ids) + len(s.output_ids) for s in running), max_batch * context)
