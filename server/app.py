"""HTTP layer: FastAPI routes and their schemas over the core's engine, scheduler and store.

Every published adapter is servable by name; requests for different tasks share one decode batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from hub.model.backbone import Backbone
from hub.serving.engine import Engine, ResidentAdapter, SamplingParams, Sequence
from hub.errors import CapacityError, HubError, NotFoundError
from hub.serving.scheduler import QueueFullError, Scheduler
from hub.store.catalog import AdapterStore
from hub.serving.sync import StoreSync
from server.playground import add_playground, training_curve_url
from server.prometheus import ServerMetrics
from tasks import make_task

log = logging.getLogger("hub.server")


@dataclass
class ServerSettings:
    max_batch: int = 32
    max_queue: int = 256
    max_resident: int | None = None
    request_timeout: float = 120.0
    watch_interval: float = 0.5


# -- schemas ----------------------------------------------------------------------------------------------------
class GenerateRequest(BaseModel):
    task: str = Field(..., description="adapter name")
    input: str | dict = Field(..., description="the task input (text, or an object for structured tasks)")
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stream: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    task: str
    version: str
    text: str
    finish_reason: str
    usage: Usage


class OpenAIRequest(BaseModel):
    """Fields shared by the OpenAI-compatible routes; `model` is the task name."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# -- the app ----------------------------------------------------------------------------------------------------
class Hub:
    """What the routes share: engine, scheduler, store, metrics."""

    def __init__(self, backbone: Backbone, store: AdapterStore, settings: ServerSettings):
        self.settings = settings
        self.store = store
        self.engine = Engine(backbone, make_task, max_resident=settings.max_resident)
        self.scheduler = Scheduler(self.engine, settings.max_batch, settings.max_queue)
        self.metrics = ServerMetrics()
        self.sync = StoreSync(store, self.engine)
        self.ready = False

    async def submit(self, task: str | None, source, params: SamplingParams, prompt_text: str | None = None):
        """Encode, enqueue, and return the sequence and the queue of its updates."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Sequence] = asyncio.Queue()
        sequence = await run_in_threadpool(self.engine.new_sequence, task, source, params, prompt_text)
        sequence.on_update = lambda s: loop.call_soon_threadsafe(updates.put_nowait, s)
        try:
            self.scheduler.submit(sequence)
        except QueueFullError:
            if sequence.adapter is not None:
                self.engine.release(sequence.adapter)
            raise
        return sequence, updates

    async def follow(self, request: Request, sequence: Sequence, updates: asyncio.Queue) -> AsyncIterator[str]:
        """Yield new text as it is decoded; cancel the sequence if the client leaves or time runs out."""
        deadline = time.monotonic() + self.settings.request_timeout
        sent, next_check = 0, 0.0
        try:
            while True:
                try:
                    await asyncio.wait_for(updates.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    pass
                now = time.monotonic()
                if now > deadline:
                    raise HTTPException(504, f"request timed out after {self.settings.request_timeout:g}s")
                if now > next_check:
                    next_check = now + 0.25
                    if await request.is_disconnected():
                        return
                done = sequence.finished  # read first: text read after it is complete when done
                ready = _stable_text(sequence, done)
                if len(ready) > sent:
                    yield ready[sent:]
                    sent = len(ready)
                if done:
                    self.metrics.observe_finished(sequence)
                    if sequence.finish_reason == "error":
                        raise HTTPException(500, "generation failed; the server log has the details")
                    return
        finally:
            if not sequence.finished:
                sequence.cancelled = True


async def _watch_store(hub: Hub) -> None:
    """Poll the store; newly published versions become servable without a restart."""
    interval = hub.settings.watch_interval
    while interval > 0:
        await asyncio.sleep(interval)
        try:
            if hub.sync.changed():
                await run_in_threadpool(hub.sync.sync)
        except Exception:  # keep watching whatever one sync met
            log.exception("store sync failed")


def _stable_text(sequence: Sequence, done: bool) -> str:
    """Text safe to send: all of it once done, else without a trailing partial UTF-8 character or a
    possible beginning of a stop string."""
    text = sequence.text
    if done:
        return text
    hold = max((len(s) - 1 for s in sequence.params.stop), default=0)
    text = text[: len(text) - hold] if hold else text
    return text.rstrip("\ufffd")


def create_app(backbone: Backbone, store: AdapterStore, settings: ServerSettings | None = None) -> FastAPI:
    hub = Hub(backbone, store, settings or ServerSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(hub.sync.sync)
        hub.scheduler.start()
        watch = asyncio.create_task(_watch_store(hub))
        hub.ready = True
        log.info("serving %s", ", ".join(sorted(hub.engine.adapters)) or "no adapters yet")
        yield
        hub.ready = False
        watch.cancel()
        await run_in_threadpool(hub.scheduler.stop)  # drains running and waiting sequences

    app = FastAPI(title="GPT-2 adapter hub", lifespan=lifespan)
    app.state.hub = hub
    add_playground(app, store)

    @app.exception_handler(HubError)
    async def hub_error(request: Request, err: HubError):
        if isinstance(err, CapacityError):
            return JSONResponse({"detail": str(err)}, status_code=429, headers={"Retry-After": "1"})
        return JSONResponse({"detail": str(err)}, status_code=404 if isinstance(err, NotFoundError) else 422)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not hub.ready:
            raise HTTPException(503, "starting or stopping")
        return {"status": "ready", "tasks": len(hub.engine.adapters)}

    @app.get("/metrics")
    async def metrics():
        stats = hub.scheduler.stats()
        return Response(hub.metrics.render(stats, hub.engine.resident_count()), media_type=hub.metrics.content_type)

    @app.get("/v1/tasks")
    async def list_tasks():
        with hub.engine.lock:
            resident = dict(hub.engine.adapters)
        versions = {s.name: [v.version for v in s.versions] for s in hub.store.list()}
        return {"tasks": [_describe(resident[name], versions.get(name, [])) for name in sorted(resident)]}

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, request: Request):
        adapter = hub.engine.resolve(body.task)
        params = SamplingParams(max_new_tokens=body.max_new_tokens or adapter.task.defaults.max_new_tokens,
                                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                seed=body.seed, stop=tuple(body.stop))
        sequence, updates = await hub.submit(body.task, body.input, params)
        hub.metrics.requests.labels(task=body.task).inc()
        if body.stream:
            return _sse(_generate_events(hub, request, sequence, updates))
        text = "".join([piece async for piece in hub.follow(request, sequence, updates)])
        return GenerateResponse(task=sequence.adapter.name, version=sequence.adapter.version, text=text,
                                finish_reason=sequence.finish_reason or "cancelled", usage=_usage(sequence))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "adapter-hub"}
            for name in sorted(hub.engine.adapters)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt if isinstance(body.prompt, str) else _single(body.prompt)
        return await _openai(hub, request, body, "text_completion", body.model, prompt, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = hub.engine.resolve(body.model)
        source = adapter.task.parse_chat([m.model_dump() for m in body.messages])
        return await _openai(hub, request, body, "chat.completion", body.model, source,
                             body.max_completion_tokens or body.max_tokens)

    def admin(authorization: str | None = Header(None)) -> None:
        token = os.environ.get("HUB_ADMIN_TOKEN")
        if not token:
            raise HTTPException(403, "admin routes are disabled: set HUB_ADMIN_TOKEN on the server")
        if not authorization or not secrets.compare_digest(authorization, f"Bearer {token}"):
            raise HTTPException(401, "missing or wrong 'Authorization: Bearer <HUB_ADMIN_TOKEN>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/admin/reload", dependencies=[Depends(admin)])
    async def reload():
        changes = await run_in_threadpool(hub.sync.sync)
        return {"loaded": changes.loaded, "unloaded": changes.unloaded, "refused": changes.refused}

    @app.delete("/v1/admin/adapters/{name}", dependencies=[Depends(admin)])
    async def unload(name: str):
        await run_in_threadpool(hub.sync.unload, name)
        return {"unloaded": name}

    return app


def _describe(adapter: ResidentAdapter, versions: list[str]) -> dict:
    meta = adapter.meta
    return {"name": adapter.name, "version": adapter.version, "versions": versions, "task_type": meta["task_type"],
            "bottleneck": meta["bottleneck"], "trainable_pct": meta["trainable_pct"],
            "metrics": meta.get("metrics", {}), "training_curve": training_curve_url(adapter.name),
            "resident": adapter.slot is not None}


def _single(prompts: list[str]) -> str:
    if len(prompts) != 1:
        raise HubError("send one prompt per request (a list of exactly one string)")
    return prompts[0]


def _usage(sequence: Sequence) -> Usage:
    return Usage(prompt_tokens=len(sequence.prompt_ids), completion_tokens=len(sequence.output_ids))


def _sse(events: AsyncIterator[dict | str]) -> StreamingResponse:
    async def encode():
        async for event in events:
            yield f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"

    return StreamingResponse(encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _generate_events(hub: Hub, request: Request, sequence: Sequence, updates) -> AsyncIterator[dict]:
    async for piece in hub.follow(request, sequence, updates):
        yield {"text": piece}
    if sequence.finished:
        yield {"finish_reason": sequence.finish_reason, "usage": _usage(sequence).model_dump(),
               "task": sequence.adapter.name, "version": sequence.adapter.version}


async def _openai(hub: Hub, request: Request, body, kind: str, model: str, source, max_tokens: int | None):
    """Shared body of /v1/completions and /v1/chat/completions."""
    adapter = hub.engine.resolve(model)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(max_new_tokens=max_tokens or adapter.task.defaults.max_new_tokens,
                            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop)
    sequence, updates = await hub.submit(model, source, params)
    hub.metrics.requests.labels(task=model).inc()
    head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": f"{adapter.name}"}
    choice = (lambda text, finish: {"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish}) if kind == "chat.completion" else \
             (lambda text, finish: {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    if body.stream:
        return _sse(_openai_events(hub, request, sequence, updates, head, kind))
    text = "".join([piece async for piece in hub.follow(request, sequence, updates)])
    return {**head, "object": kind, "choices": [choice(text, _openai_finish(sequence))],
            "usage": {**_usage(sequence).model_dump(),
                      "total_tokens": len(sequence.prompt_ids) + len(sequence.output_ids)}}


def _openai_finish(sequence: Sequence) -> str:
    return "length" if sequence.finish_reason == "length" else "stop"


async def _openai_events(hub: Hub, request: Request, sequence: Sequence, updates, head: dict, kind: str):
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

    def chunk(text: str | None, finish: str | None) -> dict:
        if kind == "chat.completion":
            delta = {"content": text} if text is not None else {}
            return {**head, "object": chunk_kind, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return {**head, "object": chunk_kind,
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

    if kind == "chat.completion":
        yield {**head, "object": chunk_kind,
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    async for piece in hub.follow(request, sequence, updates):
        yield chunk(piece, None)
    if sequence.finished:
        yield chunk(None, _openai_finish(sequence))
        yield "[DONE]"
