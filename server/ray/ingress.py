"""The ingress deployment: the same FastAPI routes as `hub serve` (`server.app.build_app`) over `RemoteService`,
which knows the tasks from the store and calls the engine deployment; Ray routes a task's requests to a replica
that already holds it. The replica that served a request is in its `x-hub-replica` header and in `/metrics`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from hub.adapters.registry import task_for
from hub.errors import CapacityError, HubError, NotFoundError
from hub.serving.composition import Composition, check_members
from hub.serving.protocol import parse_chat, request_params, Disconnected, RequestResult, TaskRef
from hub.serving.sampling import SamplingParams
from hub.serving.scheduler import SchedulerStats
from hub.serving.service import HubService, StoreCalls, describe
from hub.store.backends import Store, open_store
from hub.store.versions import AdapterSummary
from server.prometheus import ServerMetrics
from server.ray.options import REPLICA_HEADER, RayServeOptions
from tasks import make_task

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

    async def resolve(self, task: str, composition: Composition | None = None) -> TaskRef:
        """The task's newest published version, resolved once for the request; 404 naming the available ones.
        A composition resolves each member's and is checked as a replica would (at most one replica's tasks)."""
        if composition is None:
            summary = await self._summary(task)
            return TaskRef(task, summary.latest.version, task_for(summary.latest.meta, make_task))
        summaries = [await self._summary(name) for name in composition.tasks]
        tasks = [task_for(s.latest.meta, make_task) for s in summaries]
        check_members(composition, [s.latest.meta.adapter_kind for s in summaries], tasks,
                      self.options.max_tasks_per_replica)
        layout = composition.tasks.index(task)
        return TaskRef(task, summaries[layout].latest.version, tasks[layout], None, composition,
                       tuple(s.latest.version for s in summaries))

    async def _summary(self, task: str) -> AdapterSummary:
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
        return summary

    def task_names(self) -> list[str]:
        return sorted(self.summaries)

    async def list_tasks(self) -> dict:
        """Published tasks (newest usable version) as `hub serve` lists them (`resident`: on a replica heard from
        lately), with the replicas that have served them; and skipped versions."""
        listing = await self.store_calls(self.store.list)
        resident = {name for seen in self._live_replicas() for name in seen["resident"]}
        tasks = [{**describe(s.name, s.latest.version, s.latest.meta, [v.version for v in s.versions],
                             s.name in resident),
                  "replicas": sorted(r for r, seen in self.replicas.items() if s.name in seen["served"])}
                 for s in listing if s.versions]
        return {"tasks": tasks, "skipped": [{"ref": k.ref, "reason": k.reason} for s in listing for k in s.skipped]}

    params = staticmethod(request_params)
    parse_chat = staticmethod(parse_chat)

    # -- requests ---------------------------------------------------------------------------------------------
    async def submit(self, task: TaskRef | None, source: Any, params: SamplingParams,
                     prompt_text: str | None = None) -> RemoteHandle:
        """Send the request to the replica Ray picks for `task`; its first event says it was accepted."""
        if task is None:
            raise HubError("name a task: the plain base model is not served with --ray")
        call = self.engine.options(multiplexed_model_id=task.name, stream=True)
        events = call.generate.remote(task.version, source, params, prompt_text, task.composition, task.versions)
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
        return sum(len(seen["resident"]) for seen in self._live_replicas())

    def occupancy(self) -> None:
        """Held requests live in the replicas; only their stats come back (`stats`)."""
        return None

    def adapter_tiers(self) -> None:
        return None

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
        self.keys = Path(options.keys) if options.keys else None

    def __serve_build_asgi_app__(self):
        from server.app import build_app

        metrics = ServerMetrics()
        metrics.registry.register(ReplicaMetrics(self.service))
        return replica_header_middleware(build_app(self.service, self.max_body_bytes, metrics, self.keys))
