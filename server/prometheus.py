"""Prometheus metrics of the server, in a registry of its own (one per app)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hub.serving.protocol import RequestResult
from hub.serving.scheduler import SchedulerStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
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
        self.ttft = Histogram("hub_time_to_first_token_seconds", "time to first token", ["task"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("hub_time_per_output_token_seconds", "decode time per generated token",
                                   ["task"], buckets=LATENCY_BUCKETS, registry=r)

    def observe_finished(self, result: RequestResult, reason: str) -> None:
        """Count a request that ended: `reason` is its finish reason, or cancelled/timeout when it was left."""
        task = result.task
        self.finished.labels(task=task, reason=reason).inc()
        self.tokens.labels(task=task).inc(result.completion_tokens)
        self.prompt_tokens.labels(task=task).inc(result.prompt_tokens)
        if result.first_token_at is not None:
            self.ttft.labels(task=task).observe(result.first_token_at - result.created)
            if result.completion_tokens > 1:
                decode = time.monotonic() - result.first_token_at
                self.per_token.labels(task=task).observe(decode / (result.completion_tokens - 1))

    def render(self, stats: SchedulerStats, resident: int, ready: bool = True) -> bytes:
        self.queue_depth.set(stats.waiting)
        self.batch_size.set(stats.running)
        self.resident.set(resident)
        self.ready.set(int(ready))
        self.loads.set(stats.adapter_loads)
        self.load_failures.set(stats.adapter_load_failures)
        self.load_seconds.set(stats.adapter_load_seconds)
        return generate_latest(self.registry)
