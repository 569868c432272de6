"""Prometheus metrics of the server, in a registry of its own (one per app).

Besides the hub's own series, the gauges of the Kubernetes Gateway API Inference Extension's Model Server
Protocol under vLLM's names (`MODEL_SERVER_PROTOCOL`), so an endpoint picker routes a request to the replica that
has its adapter: queued and running requests, the share of the batch's KV budget in use, and
`vllm:lora_requests_info` naming the adapters of running and waiting requests. Label sets stay bounded: per-task
series name at most `MAX_TASK_LABELS` tasks, the residency gauge only the adapters known now.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hub.serving.occupancy import Occupancy
from hub.serving.protocol import RequestResult
from hub.serving.scheduler import SchedulerStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MAX_TASK_LABELS = 256  # tasks named in per-task series; later ones are counted under OTHER_TASKS
OTHER_TASKS = "_other"
# name -> (type, labels) of the Model Server Protocol's metrics as this server exports them
MODEL_SERVER_PROTOCOL = {
    "vllm:num_requests_waiting": ("gauge", ()),
    "vllm:num_requests_running": ("gauge", ()),
    "vllm:kv_cache_usage_perc": ("gauge", ()),
    "vllm:lora_requests_info": ("gauge", ("max_lora", "running_lora_adapters", "waiting_lora_adapters")),
}


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.labelled: set[str] = set()
        r = self.registry
        self.requests = Counter("hub_requests", "generation requests", ["task"], registry=r)
        self.finished = Counter("hub_finished", "finished requests by reason", ["task", "reason"], registry=r)
        self.tokens = Counter("hub_generated_tokens", "generated tokens", ["task"], registry=r)
        self.prompt_tokens = Counter("hub_prompt_tokens", "prompt tokens", ["task"], registry=r)
        self.queue_depth = Gauge("hub_queue_depth", "requests waiting to join the batch", registry=r)
        self.batch_size = Gauge("hub_running_batch_size", "sequences in the running batch", registry=r)
        self.resident = Gauge("hub_resident_adapters", "adapters resident on the device", registry=r)
        self.loads = Gauge("hub_adapter_loads", "store reads of adapter weights so far (cold adapters)", registry=r)
        self.load_failures = Gauge("hub_adapter_load_failures", "adapter loads that failed so far", registry=r)
        self.load_seconds = Gauge("hub_adapter_load_seconds", "seconds spent reading adapters so far", registry=r)
        self.ready = Gauge("hub_ready", "1 while the server can serve (its engine thread is running), else 0",
                           registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "requests waiting to join the batch", registry=r)
        self.running = Gauge("vllm:num_requests_running", "requests in the running batch", registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "share of the batch's KV budget (max batch rows x context "
                              "tokens) in use, 0 to 1", registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "adapters of running and waiting requests (the value is "
                               "when it was sampled)", MODEL_SERVER_PROTOCOL["vllm:lora_requests_info"][1],
                               registry=r)
        self.residency = Gauge("hub_adapter_residency", "1 for where each known adapter's weights are now: device "
                               "(a slot), cpu, or store", ["task", "tier"], registry=r)
        self.ttft = Histogram("hub_time_to_first_token_seconds", "time to first token", ["task"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("hub_time_per_output_token_seconds", "decode time per generated token",
                                   ["task"], buckets=LATENCY_BUCKETS, registry=r)

    def task_label(self, task: str) -> str:
        """A task's label value: its name for the first `MAX_TASK_LABELS` tasks seen, then "other" (a label set
        stays bounded however many adapters come and go)."""
        if task in self.labelled or len(self.labelled) < MAX_TASK_LABELS:
            self.labelled.add(task)
            return task
        return OTHER_TASKS

    def observe_finished(self, result: RequestResult, reason: str) -> None:
        """Count a request that ended: `reason` is its finish reason, or cancelled/timeout when it was left."""
        task = self.task_label(result.task)
        self.finished.labels(task=task, reason=reason).inc()
        self.tokens.labels(task=task).inc(result.completion_tokens)
        self.prompt_tokens.labels(task=task).inc(result.prompt_tokens)
        if result.first_token_at is not None:
            self.ttft.labels(task=task).observe(result.first_token_at - result.created)
            if result.completion_tokens > 1:
                decode = time.monotonic() - result.first_token_at
                self.per_token.labels(task=task).observe(decode / (result.completion_tokens - 1))

    def render(self, stats: SchedulerStats, resident: int, ready: bool = True,
               held: Occupancy | None = None) -> bytes:
        """The scrape; `held` (the backend's `occupancy()`, where it has one) fills the protocol's adapter and KV
        gauges."""
        self.queue_depth.set(stats.waiting)
        self.batch_size.set(stats.running)
        self.resident.set(resident)
        self.ready.set(int(ready))
        self.loads.set(stats.adapter_loads)
        self.load_failures.set(stats.adapter_load_failures)
        self.load_seconds.set(stats.adapter_load_seconds)
        self._protocol_gauges(stats, held or Occupancy())
        return generate_latest(self.registry)

    def _protocol_gauges(self, stats: SchedulerStats, held: Occupancy) -> None:
        self.waiting.set(stats.waiting)
        self.running.set(stats.running)
        self.kv_usage.set(held.kv_usage)
        self.lora_info.clear()
        self.lora_info.labels(max_lora=str(held.max_adapters), running_lora_adapters=",".join(held.running_adapters),
                              waiting_lora_adapters=",".join(held.waiting_adapters)).set(time.time())
        self.residency.clear()
        for task, tier in sorted(held.tiers.items())[:MAX_TASK_LABELS]:
            self.residency.labels(task=task, tier=tier).set(1)
