"""The engine deployment: each replica owns a `HubService` (engine + scheduler) that starts with no adapter and
loads a task when it first serves it, through `@serve.multiplexed` (Ray unloads its least recently used task
beyond `max_tasks_per_replica`). A request joins the replica's one running batch; its text streams back event by
event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, replace
from typing import Any, AsyncIterator, Awaitable, Callable

import torch
from ray import serve

from hub.errors import NotFoundError
from hub.model.dtypes import torch_dtype
from hub.serving.composition import Composition
from hub.serving.engine import Engine
from hub.serving.sampling import SamplingParams
from hub.serving.service import HubService
from hub.store.backends import open_store
from hub.store.fingerprint import backbone_for_adapters
from server.ray.options import RayServeOptions
from tasks import make_task

log = logging.getLogger("hub.ray")


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

    async def generate(self, version: str, source: Any, params: SamplingParams, prompt_text: str | None,
                       composition: Composition | None = None, versions: tuple[str, ...] = ()) -> AsyncIterator[dict]:
        """Events: {replica, result}, then {text} pieces, then {result, stats, resident} (`RequestResult`s;
        `resident`: the tasks holding a device slot here). A composed request (routed by its layout task) has
        every member loaded here, at the versions the ingress resolved."""
        task = serve.get_multiplexed_model_id()
        for name, wanted in zip(composition.tasks, versions) if composition else ((task, version),):
            await self._resident(name, wanted)
        handle = await self.service.submit(await self.service.resolve(task, composition), source, params,
                                           prompt_text)
        yield {"replica": self.replica, "result": handle.result()}
        async for piece in self.service.stream(handle, _never):
            yield {"text": piece}
        yield {"result": handle.result(), "stats": asdict(self.service.stats()), "resident": self._resident_tasks()}

    def _resident_tasks(self) -> list[str]:
        return [a.name for a in self.service.manager.known() if a.slot is not None]

    def __del__(self) -> None:
        self.service.stop()


async def _never() -> bool:
    """The replica cannot see the HTTP client; the ingress cancels the Ray call when it leaves."""
    return False
