"""Prometheus metrics of the server, in a registry of its own (one per app).

Besides the hub's own series, the gauges of the Kubernetes Gateway API Inference Extension's Model Server
Protocol under vLLM's names (`MODEL_SERVER_PROTOCOL`), so an endpoint picker routes a request to the replica that
has its adapter: queued and running requests, the share of the batch's KV budget in use, and
`vllm:lora_requests_info` naming the adapters of running and waiting requests.

Per-adapter series (requests, tokens, latencies, residency tier) are labelled by task name, bounded: the first
`MAX_ADAPTER_LABELS` adapters seen keep their own label, later ones are summed under `other` (likewise API keys,
`MAX_KEY_LABELS`), so a hub with thousands of adapters cannot blow up a Prometheus server.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from hub.serving.occupancy import Occupancy
from hub.serving.protocol import RequestResult
from hub.serving.scheduler import SchedulerStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
MAX_ADAPTER_LABELS = 50
MAX_KEY_LABELS = 100
OTHER = "other"
TIERS = ("device", "cpu", "store")


class BoundedLabels:
    """The first `cap` distinct values keep their own label; later ones become `other`."""

    def __init__(self, cap: int):
        self.cap = cap
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self.lock:
            if value in self.seen or len(self.seen) < self.cap:
                self.seen.add(value)
                return value
        return OTHER


class BoundedMetric:
    """A labelled metric whose `task` (or `key`) label goes through `BoundedLabels`."""

    def __init__(self, metric: Any, bound: BoundedLabels, label: str = "task"):
        self.metric, self.bound, self.label = metric, bound, label

    def labels(self, **labels: str) -> Any:
        return self.metric.labels(**{**labels, self.label: self.bound(labels[self.label])})


class TierCollector:
    """`hub_adapter_tier{task, tier}`: how many of the label's adapters are in each tier (1 or 0 for a named
    adapter, a count for `other`); read from the backend's `adapter_tiers()` at each scrape where it has one."""

    def __init__(self, tiers: Callable[[], dict[str, str]], bound: BoundedLabels):
        self.tiers, self.bound = tiers, bound

    def collect(self):
        family = GaugeMetricFamily("hub_adapter_tier", "adapters per residency tier (device slot, CPU copy, "
                                   "store only)", labels=["task", "tier"])
        counts: dict[tuple[str, str], int] = {}
        for name, tier in sorted(self.tiers().items()):
            label = self.bound(name)
            for each in TIERS:
                counts[label, each] = counts.get((label, each), 0) + (tier == each)
        for (label, tier), count in sorted(counts.items()):
            family.add_metric([label, tier], count)
        yield family


class KeyMetrics:
    """Per-key counters (`hub serve --keys`): requests admitted or refused, tokens, and calls without a valid key."""

    def __init__(self, registry: CollectorRegistry):
        keys = BoundedLabels(MAX_KEY_LABELS)
        self.requests = BoundedMetric(Counter("hub_key_requests", "requests by API key and outcome (admitted, "
                                              "forbidden, rate_limited)", ["key", "outcome"], registry=registry),
                                      keys, "key")
        self.token_counts = BoundedMetric(Counter("hub_key_tokens", "tokens by API key (prompt, completion)",
                                                  ["key", "kind"], registry=registry), keys, "key")
        self.unauthorized = Counter("hub_key_unauthorized", "requests without a valid API key (401)",
                                    registry=registry)

    def admitted(self, key: str) -> None:
        self.requests.labels(key=key, outcome="admitted").inc()

    def refused(self, key: str, outcome: str) -> None:
        self.requests.labels(key=key, outcome=outcome).inc()

    def tokens(self, key: str, prompt: int, completion: int) -> None:
        self.token_counts.labels(key=key, kind="prompt").inc(prompt)
        self.token_counts.labels(key=key, kind="completion").inc(completion)
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
        self.adapters = bound = BoundedLabels(MAX_ADAPTER_LABELS)
        self.requests = BoundedMetric(Counter("hub_requests", "generation requests", ["task"], registry=r), bound)
        self.finished = BoundedMetric(Counter("hub_finished", "finished requests by reason", ["task", "reason"],
                                              registry=r), bound)
        self.tokens = BoundedMetric(Counter("hub_generated_tokens", "generated tokens", ["task"], registry=r), bound)
        self.prompt_tokens = BoundedMetric(Counter("hub_prompt_tokens", "prompt tokens", ["task"], registry=r), bound)
        self.latency = BoundedMetric(Histogram("hub_request_latency_seconds", "end-to-end request latency",
                                               ["task"], buckets=REQUEST_BUCKETS, registry=r), bound)
        self.queue_depth = Gauge("hub_queue_depth", "requests waiting to join the batch", registry=r)
        self.batch_size = Gauge("hub_running_batch_size", "sequences in the running batch", registry=r)
        self.resident = Gauge("hub_resident_adapters", "adapters resident on the device", registry=r)
        self.loads = Gauge("hub_adapter_loads", "store reads of adapter weights so far (cold adapters)", registry=r)
        self.load_failures = Gauge("hub_adapter_load_failures", "adapter loads that failed so far", registry=r)
        self.load_seconds = Gauge("hub_adapter_load_seconds", "seconds spent reading adapters so far", registry=r)
        self.ready = Gauge("hub_ready", "1 while the server can serve (its engine thread is running), else 0",
                           registry=r)
        self.ttft = BoundedMetric(Histogram("hub_time_to_first_token_seconds", "time to first token", ["task"],
                                            buckets=LATENCY_BUCKETS, registry=r), bound)
        self.per_token = BoundedMetric(Histogram("hub_time_per_output_token_seconds", "decode time per generated "
                                                 "token", ["task"], buckets=LATENCY_BUCKETS, registry=r), bound)
        self.key_metrics = KeyMetrics(r)
        self.waiting = Gauge("vllm:num_requests_waiting", "requests waiting to join the batch", registry=r)
        self.running = Gauge("vllm:num_requests_running", "requests in the running batch", registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "share of the batch's KV budget (max batch rows x context "
                              "tokens) in use, 0 to 1", registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "adapters of running and waiting requests (the value is "
                               "when it was sampled)", MODEL_SERVER_PROTOCOL["vllm:lora_requests_info"][1],
                               registry=r)

    def watch_tiers(self, backend: Any) -> None:
        """Export each adapter's residency tier, where the backend tells it (`HubService`; not under Ray)."""
        if backend.adapter_tiers() is not None:
            self.registry.register(TierCollector(backend.adapter_tiers, self.adapters))

    def observe_finished(self, result: RequestResult, reason: str) -> None:
        """Count a request that ended: `reason` is its finish reason, or cancelled/timeout when it was left."""
        task = result.task
        self.finished.labels(task=task, reason=reason).inc()
        self.tokens.labels(task=task).inc(result.completion_tokens)
        self.prompt_tokens.labels(task=task).inc(result.prompt_tokens)
        self.latency.labels(task=task).observe(time.monotonic() - result.created)
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
