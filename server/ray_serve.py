"""`hub serve --ray`: the hub's HTTP API as a Ray Serve application, tasks multiplexed over engine replicas.

Two deployments:

- `EngineReplica` (`--replicas N`): each replica owns a `HubService` (engine + scheduler) that starts with no
  adapter. A request arrives with `multiplexed_model_id=<task>`; the replica loads that task from the store
  through `@serve.multiplexed(max_num_models_per_replica=K)` (Ray unloads its least recently used task beyond
  K), then the request joins the replica's one running batch, so requests for *different* resident tasks decode
  together (no `@serve.batch`: it would split batches by model id). Text streams back event by event.
- `Ingress`: the same FastAPI routes as `hub serve` (`server.app.build_app`) over `RemoteService`, which knows
  the tasks from the store and calls the engine deployment; Ray routes a task's requests to a replica that
  already holds it. The replica that served a request is in its `x-hub-replica` header and in `/metrics`.

Errors keep their HTTP meaning: a replica's `HubError` is raised again in the ingress (404, 422, 504, ...); a
full replica queue, or Ray's back-pressure once every replica is busy and `max_queued_requests` wait, is 429
with Retry-After.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import math
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, AsyncIterator, Awaitable, Callable

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from hub.adapters.registry import task_for
from hub.errors import CapacityError, HubError, NotFoundError
from hub.model.dtypes import torch_dtype
from hub.serving.engine import Engine
from hub.serving.protocol import Disconnected, RequestResult, TaskRef
from hub.serving.sampling import SamplingParams, sampling_params
from hub.serving.scheduler import SchedulerStats
from hub.serving.service import HubService, ServiceSettings, StoreCalls
from hub.store.backends import Store, open_store
from hub.store.fingerprint import backbone_for_adapters
from hub.store.versions import AdapterSummary
from server.edge import DEFAULT_MAX_BODY_BYTES
from server.prometheus import ServerMetrics
from tasks import make_task

log = logging.getLogger("hub.ray")

REPLICA_HEADER = "x-hub-replica"
APP_NAME = "hub"


@dataclass(frozen=True)
class RayServeOptions:
    """Everything a replica needs to build itself (pickled to every node)."""

    store: str
    base: str | None = None
    device: str = "cpu"
    dtype: str = "auto"  # or a torch dtype name: float32, bfloat16, float16
    threads: int | None = None  # torch threads per replica (default: Ray's OMP_NUM_THREADS, its CPUs)
    replicas: int = 2
    max_tasks_per_replica: int = 8
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    service: ServiceSettings = field(default_factory=ServiceSettings)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @property
    def replica_capacity(self) -> int:
        """Requests one replica holds: its running batch and its queue."""
        return self.service.max_batch + self.service.max_queue


# -- engine replicas ---------------------------------------------------------------------------------------------
class ResidentTask:
    """What `@serve.multiplexed` caches per task; Ray calls `__del__` when it evicts it (LRU beyond K)."""

    def __init__(self, engine: Engine, name: str):
        self.engine, self.name, self.unloaded = engine, name, False

    def __del__(self) -> None:
        if not self.unloaded:
            self.unloaded = True
            with contextlib.suppress(NotFoundError):  # already replaced or removed
                self.engine.manager.remove(self.name)


@serve.deployment
class EngineReplica:
    async def __init__(self, options: RayServeOptions):
        store = open_store(options.store)
        if options.threads:
            torch.set_num_threads(options.threads)
        refs = [s.latest.ref for s in store.list() if s.versions]
        backbone = backbone_for_adapters(store, refs, options.base, options.device, torch_dtype(options.dtype))
        settings = replace(options.service, max_resident=options.max_tasks_per_replica, watch_interval=0)
        self.watch_interval = options.service.watch_interval
        self.service = HubService(backbone, store, make_task, settings)
        await self.service.start(preload=False)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.load_task = serve.multiplexed(max_num_models_per_replica=options.max_tasks_per_replica)(self._loader())
        self.checked_at: dict[str, float] = {}
        self.checks: set[asyncio.Task] = set()  # version checks running in the background

    def _loader(self) -> Callable[[str], Awaitable[ResidentTask]]:
        """The loader Ray multiplexes: a plain function (Ray keeps its LRU on it; a bound method takes no
        attributes)."""

        async def load(task: str) -> ResidentTask:
            await asyncio.to_thread(self._load_latest, task)
            return ResidentTask(self.service.engine, task)

        return load

    def _load_latest(self, task: str, version: str | None = None) -> None:
        """Load `version` of `task` (default: the newest published) unless it is the one resident (hot
        publishing); the ingress names the version it resolved the request to."""
        store, manager = self.service.store, self.service.manager
        wanted = store.show(task if version is None else f"{task}@{version}")
        current = manager.get(task)
        if current is None or current.version != wanted.version:
            manager.add_adapter(store.load(wanted.ref, manager.backbone.fingerprint))
        self.checked_at[task] = time.monotonic()

    async def _resident(self, task: str, version: str) -> None:
        """Through Ray's LRU of tasks, then the version the ingress resolved. A resident task is checked for a
        newer version every `watch_interval`, in the background."""
        await self.load_task(task)
        current = self.service.manager.get(task)
        if current is None or current.version != version:
            await asyncio.to_thread(self._load_latest, task, version)
        if time.monotonic() - self.checked_at.get(task, 0.0) > self.watch_interval:
            self.checked_at[task] = time.monotonic()  # one check at a time per task
            self.checks.add(check := asyncio.create_task(asyncio.to_thread(self._load_latest, task)))
            check.add_done_callback(self._checked)

    def _checked(self, check: asyncio.Task) -> None:
        self.checks.discard(check)
        if not check.cancelled() and check.exception() is not None:
            log.warning("checking for a newer version failed: %s", check.exception())

    async def generate(self, version: str, source: Any, params: SamplingParams,
                       prompt_text: str | None) -> AsyncIterator[dict]:
        """Events: {replica, result}, then {text} pieces, then {result, stats, resident} (`RequestResult`s)."""
        task = serve.get_multiplexed_model_id()
        await self._resident(task, version)
        handle = await self.service.submit(await self.service.resolve(task), source, params, prompt_text)
        yield {"replica": self.replica, "result": handle.result()}
        async for piece in self.service.stream(handle, _never):
            yield {"text": piece}
        yield {"result": handle.result(), "stats": asdict(self.service.stats()),
               "resident": self.service.resident_count()}

    def __del__(self) -> None:
        self.service.stop()


async def _never() -> bool:
    """The replica cannot see the HTTP client; the ingress cancels the Ray call when it leaves."""
    return False


# -- ingress -----------------------------------------------------------------------------------------------------
NEGATIVE_TTL = 2.0  # seconds an unknown task name is answered 404 without listing the store again
MIN_RELIST = 0.5  # seconds between listings that unknown names may force
STALE_REPLICA = 60.0  # a replica not heard from for this long no longer counts in queue and batch gauges


@dataclass
class RemoteHandle:
    """A request decoded on a replica: the result as the replica last reported it, and its event stream."""

    task: TaskRef
    replica: str
    state: RequestResult
    events: DeploymentResponseGenerator

    def result(self) -> RequestResult:
        return self.state


# The replica of the current HTTP request, for the response header (a holder set per request by the middleware).
_replica_of_request: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hub_replica", default=None)


class RemoteService:
    """The `ServingBackend` over the engine deployment. Tasks come from the store's listing, refreshed off the
    event loop every `watch_interval` (`watch_store`); names not seen yet force a listing at most once every
    `MIN_RELIST` seconds, and an unknown name is answered from a negative cache for `NEGATIVE_TTL` seconds, so
    unknown names cannot make the ingress list the bucket per request. Sentence-VAE routes are not served."""

    vae = None

    def __init__(self, engine: DeploymentHandle, store: Store, options: RayServeOptions):
        self.engine, self.store, self.options = engine, store, options
        self.on_finished: Callable[[RequestResult, str], None] | None = None
        self.replicas: dict[str, dict] = {}  # replica -> its stats as last reported, "served" per task
        self.summaries: dict[str, AdapterSummary] = {}
        self.forced_at = -math.inf  # when an unknown name last forced a listing
        self.listing: asyncio.Future | None = None  # the listing under way, shared by whoever needs it
        self.unknown: dict[str, float] = {}  # task name -> when it was last found unknown
        self.store_calls = StoreCalls(options.service.store_timeout)
        self.ready = False

    # -- lifecycle: the replicas own the engines ---------------------------------------------------------------
    async def start(self) -> None:
        await self._relist()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self.store_calls.close()

    def not_ready_reason(self) -> str | None:
        return None if self.ready else "starting or stopping"

    async def watch_store(self) -> None:
        """Refresh the listing every `watch_interval` (off the event loop); replicas load new versions."""
        interval = self.options.service.watch_interval
        while interval > 0:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):  # a store that does not answer now may answer next time
                await self._relist()

    async def store_call(self, fn: Callable, *args) -> Any:
        return await self.store_calls(fn, *args)

    # -- tasks ------------------------------------------------------------------------------------------------
    async def _relist(self) -> None:
        """List the store (one listing at a time: callers arriving meanwhile share it)."""
        if self.listing is None:
            self.listing = asyncio.ensure_future(self.store_calls(self.store.list))
        listing, call = None, self.listing
        try:
            listing = await asyncio.shield(call)
        finally:
            if self.listing is call and call.done():
                self.listing = None
        self.summaries = {s.name: s for s in listing if s.versions}

    async def resolve(self, task: str) -> TaskRef:
        """The task's newest published version, resolved once for the request; 404 naming the available ones."""
        summary = self.summaries.get(task)
        now = time.monotonic()
        if summary is None and now - self.unknown.get(task, -math.inf) > NEGATIVE_TTL \
                and now - self.forced_at > MIN_RELIST:
            self.forced_at = now
            await self._relist()
            summary = self.summaries.get(task)
        if summary is None:
            if len(self.unknown) > 4096:
                self.unknown.clear()
            self.unknown[task] = now
            raise NotFoundError(f"unknown task {task!r}; available: {', '.join(self.task_names()) or 'none'}")
        meta = summary.latest.meta
        return TaskRef(task, summary.latest.version, task_for(meta, make_task))

    def task_names(self) -> list[str]:
        return sorted(self.summaries)

    async def list_tasks(self) -> dict:
        """Published tasks (newest usable version) with the replicas that have served them, and skipped versions."""
        listing = await self.store_calls(self.store.list)
        tasks = [{"name": s.name, "version": s.latest.version, "versions": [v.version for v in s.versions],
                  "task_type": s.latest.meta.task_type, "bottleneck": s.latest.meta.bottleneck,
                  "trainable_pct": s.latest.meta.trainable_pct,
                  "replicas": sorted(r for r, seen in self.replicas.items() if s.name in seen["served"])}
                 for s in listing if s.versions]
        return {"tasks": tasks, "skipped": [{"ref": k.ref, "reason": k.reason} for s in listing for k in s.skipped]}

    @staticmethod
    def params(task: TaskRef | None, **fields) -> SamplingParams:
        return sampling_params(task.task.defaults.max_new_tokens if task else None, **fields)

    @staticmethod
    def parse_chat(task: TaskRef, messages: list[dict]) -> Any:
        return task.task.parse_chat(messages)

    # -- requests ---------------------------------------------------------------------------------------------
    async def submit(self, task: TaskRef | None, source: Any, params: SamplingParams,
                     prompt_text: str | None = None) -> RemoteHandle:
        """Send the request to the replica Ray picks for `task`; its first event says it was accepted."""
        if task is None:
            raise HubError("name a task: the plain base model is not served with --ray")
        call = self.engine.options(multiplexed_model_id=task.name, stream=True)
        events = call.generate.remote(task.version, source, params, prompt_text)
        first = await _next_event(events)
        holder = _replica_of_request.get()
        if holder is not None:
            holder["replica"] = first["replica"]
        return RemoteHandle(task, first["replica"], first["result"], events)

    async def stream(self, handle: RemoteHandle, disconnected: Disconnected) -> AsyncIterator[str]:
        """The replica's text as it arrives; the Ray call is cancelled if the client leaves first."""
        try:
            while not handle.state.finished:
                event = await _next_event(handle.events)
                if "text" in event:
                    handle.state.first_token_at = handle.state.first_token_at or time.monotonic()
                    handle.state.text += event["text"]
                    yield event["text"]
                else:
                    handle.state = replace(event["result"], created=handle.state.created,
                                           first_token_at=handle.state.first_token_at)
                    self._record(handle, event)
        finally:  # every request is counted once, as in HubService.stream
            self.cancel(handle)
            if self.on_finished:
                self.on_finished(handle.state, handle.state.finish_reason or "cancelled")

    def _record(self, handle: RemoteHandle, event: dict) -> None:
        seen = self.replicas.setdefault(handle.replica, {"served": collections.Counter()})
        seen.update(stats=SchedulerStats(**event["stats"]), resident=event["resident"], at=time.monotonic())
        seen["served"][handle.task.name] += 1

    complete = HubService.complete  # the whole text of `stream`

    @staticmethod
    def cancel(handle: RemoteHandle) -> None:
        if not handle.state.finished:
            handle.events.cancel()

    # -- tables and operations ----------------------------------------------------------------------------
    def _live_replicas(self) -> list[dict]:
        now = time.monotonic()
        return [seen for seen in self.replicas.values() if now - seen["at"] <= STALE_REPLICA]

    def stats(self) -> SchedulerStats:
        """Queue and batch summed over the replicas heard from lately (a replaced replica drops out), the
        counters (decode steps, adapter loads) over every replica that ever reported."""
        live, every = self._live_replicas(), [seen["stats"] for seen in self.replicas.values()]
        totals = {f.name: sum(getattr(s, f.name) for s in every) for f in fields(SchedulerStats)}
        return SchedulerStats(**{**totals, "waiting": sum(s["stats"].waiting for s in live),
                                 "running": sum(s["stats"].running for s in live)})

    def resident_count(self) -> int:
        return sum(seen["resident"] for seen in self._live_replicas())

    async def reload(self):
        raise HubError("with --ray each replica loads tasks from the store when it first serves them, and checks "
                       "for new versions every --watch-interval: there is nothing to reload")

    def unload(self, name: str) -> None:
        raise HubError("with --ray each replica unloads its least recently used tasks itself")


class ReplicaMetrics:
    """Prometheus collector: per replica, the requests it served per task, its decode steps, and how many of
    those held more than one task (fused mixed batches)."""

    def __init__(self, service: RemoteService):
        self.service = service

    def collect(self):
        served = CounterMetricFamily("hub_replica_requests", "requests a replica served", labels=["replica", "task"])
        steps = GaugeMetricFamily("hub_replica_steps", "decode steps of a replica", labels=["replica"])
        mixed = GaugeMetricFamily("hub_replica_mixed_steps", "decode steps whose batch held several tasks",
                                  labels=["replica"])
        for replica, seen in sorted(self.service.replicas.items()):
            for task, count in sorted(seen["served"].items()):
                served.add_metric([replica, task], count)
            steps.add_metric([replica], seen["stats"].steps)
            mixed.add_metric([replica], seen["stats"].mixed_steps)
        yield from (served, steps, mixed)


async def _next_event(events: DeploymentResponseGenerator) -> dict:
    """The next event of a replica's stream; its HubError raised as such, Ray's back-pressure as a 429."""
    try:
        return await events.__anext__()
    except RayTaskError as err:
        if isinstance(err.cause, HubError):
            raise err.cause from None
        raise
    except BackPressureError:
        raise CapacityError("every replica is busy and the queue in front of them is full; retry shortly") from None
    except StopAsyncIteration:
        raise HubError("the replica ended the request without an answer") from None


def replica_header_middleware(app):
    """ASGI middleware: put the serving replica in the response's `x-hub-replica` header."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        holder: dict = {}
        token = _replica_of_request.set(holder)

        async def send_with_header(message):
            if message["type"] == "http.response.start" and "replica" in holder:
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.encode(), holder["replica"].encode())]}
            await send(message)

        try:
            await app(scope, receive, send_with_header)
        finally:
            _replica_of_request.reset(token)

    return middleware


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, engine: DeploymentHandle, options: RayServeOptions):
        self.service = RemoteService(engine, open_store(options.store), options)
        self.max_body_bytes = options.max_body_bytes

    def __serve_build_asgi_app__(self):
        from server.app import build_app

        metrics = ServerMetrics()
        metrics.registry.register(ReplicaMetrics(self.service))
        return replica_header_middleware(build_app(self.service, self.max_body_bytes, metrics))


# -- application and launcher ------------------------------------------------------------------------------------
def application(options: RayServeOptions):
    """The Ray Serve application (also what `serve run` / a KubeRay RayService imports via `app_builder`)."""
    capacity = options.replica_capacity
    engine = EngineReplica.options(
        num_replicas=options.replicas, max_ongoing_requests=capacity, max_queued_requests=options.service.max_queue,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
    ).bind(options)
    ingress = Ingress.options(max_ongoing_requests=capacity * options.replicas + options.service.max_queue,
                              ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine, options)


# The numeric fields of RayServeOptions and ServiceSettings; every other argument is a string.
NUMBER_ARGUMENTS = {"replicas": int, "max_tasks_per_replica": int, "replica_cpus": float, "replica_gpus": float,
                    "threads": int, "max_body_bytes": int, "max_batch": int, "max_queue": int, "max_resident": int,
                    "max_cpu_adapters": int, "request_timeout": float, "watch_interval": float, "prefill_chunk": int,
                    "store_timeout": float}


def options_from_args(args: dict[str, str]) -> RayServeOptions:
    """Options from `serve run` / RayService string arguments (ServiceSettings' fields go into `service`)."""
    service_names = {f.name for f in fields(ServiceSettings)}
    allowed = (service_names | {f.name for f in fields(RayServeOptions)}) - {"service"}
    unknown = sorted(args.keys() - allowed)
    if unknown or "store" not in args:
        raise HubError(f"app_builder takes store=URL and the options of `hub serve --ray`; unknown: {unknown}")
    try:
        values = {k: NUMBER_ARGUMENTS.get(k, str)(v) for k, v in args.items()}
    except ValueError as err:
        raise HubError(f"app_builder: {err}") from None
    return RayServeOptions(**{k: v for k, v in values.items() if k not in service_names},
                           service=ServiceSettings(**{k: v for k, v in values.items() if k in service_names}))


def app_builder(args: dict[str, str]):
    """`serve run server.ray_serve:app_builder store=s3://bucket/adapters replicas=2 ...` (and RayService YAML)."""
    return application(options_from_args(args))


def serve_on_ray(options: RayServeOptions, address: str | None, host: str, port: int) -> None:
    """Start (or join, with `address`) a Ray cluster, run the application, serve until SIGTERM/SIGINT."""
    import ray

    if address:
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(options.replicas * options.replica_cpus) + 1),
                 include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(options), name=APP_NAME, route_prefix="/")
        print(f"serving on http://{host}:{port} with {options.replicas} engine replicas", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
