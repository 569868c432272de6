"""HTTP layer: FastAPI routes and their schemas over `hub.serving.service.HubService`.

Every published adapter is servable by name; requests for different tasks share one decode batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from hub.errors import CapacityError, HubError, NotFoundError
from hub.model.backbone import Backbone
from hub.serving.sequence import Sequence
from hub.serving.service import (GenerationFailedError, Handle, HubService, RequestTimeoutError,
                                 ServiceSettings)
from hub.store.catalog import AdapterStore
from server.prometheus import ServerMetrics
from server.vae import vae_router
from tasks import make_task


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
    min_tokens: int = Field(0, ge=0, description="no EOS or stop string before this many tokens (vLLM)")
    ignore_eos: bool = Field(False, description="decode to max_new_tokens whatever EOS says (vLLM)")
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
    min_tokens: int = Field(0, ge=0, description="vLLM's extra parameter: no EOS or stop before this many tokens")
    ignore_eos: bool = Field(False, description="vLLM's extra parameter: decode to max_tokens")


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
def create_app(backbone: Backbone, store: AdapterStore, settings: ServiceSettings | None = None) -> FastAPI:
    hub = HubService(backbone, store, make_task, settings)
    metrics = ServerMetrics()
    hub.on_finished = metrics.observe_finished

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(hub.start)
        watch = asyncio.create_task(hub.watch_store())
        yield
        watch.cancel()
        await run_in_threadpool(hub.stop)  # drains running and waiting sequences

    app = FastAPI(title="GPT-2 adapter hub", lifespan=lifespan)
    app.state.hub = hub
    app.include_router(vae_router(hub))

    @app.exception_handler(HubError)
    async def hub_error(request: Request, err: HubError):
        if isinstance(err, CapacityError):
            return JSONResponse({"detail": str(err)}, status_code=429, headers={"Retry-After": "1"})
        return JSONResponse({"detail": str(err)}, status_code=_status(err))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not hub.ready:
            raise HTTPException(503, "starting or stopping")
        return {"status": "ready", "tasks": len(hub.engine.adapters)}

    @app.get("/metrics")
    async def metrics_route():
        stats = hub.scheduler.stats()
        return Response(metrics.render(stats, hub.engine.resident_count()), media_type=metrics.content_type)

    @app.get("/v1/tasks")
    async def list_tasks():
        return {"tasks": await run_in_threadpool(hub.list_tasks)}

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, request: Request):
        params = hub.params(body.task, max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                            top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=body.stop,
                            min_tokens=body.min_tokens, ignore_eos=body.ignore_eos)
        handle = await hub.submit(body.task, body.input, params)
        metrics.requests.labels(task=body.task).inc()
        if body.stream:
            return _sse(_generate_events(hub, request, handle))
        text = await _complete(hub, request, handle)
        sequence = handle.sequence
        return GenerateResponse(task=sequence.adapter.name, version=sequence.adapter.version, text=text,
                                finish_reason=sequence.finish_reason or "cancelled", usage=_usage(sequence))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "adapter-hub"}
            for name in hub.task_names()]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt if isinstance(body.prompt, str) else _single(body.prompt)
        return await _openai(hub, metrics, request, body, "text_completion", prompt, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        source = hub.resolve(body.model).task.parse_chat([m.model_dump() for m in body.messages])
        return await _openai(hub, metrics, request, body, "chat.completion", source,
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
        changes = await run_in_threadpool(hub.reload)
        return {"loaded": changes.loaded, "unloaded": changes.unloaded, "refused": changes.refused}

    @app.delete("/v1/admin/adapters/{name}", dependencies=[Depends(admin)])
    async def unload(name: str):
        await run_in_threadpool(hub.unload, name)
        return {"unloaded": name}

    return app


def _status(err: HubError) -> int:
    if isinstance(err, RequestTimeoutError):
        return 504
    if isinstance(err, GenerationFailedError):
        return 500
    return 404 if isinstance(err, NotFoundError) else 422


def _stream(hub: HubService, request: Request, handle: Handle) -> AsyncIterator[str]:
    return hub.stream(handle, request.is_disconnected)


async def _complete(hub: HubService, request: Request, handle: Handle) -> str:
    return await hub.complete(handle, request.is_disconnected)


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


async def _generate_events(hub: HubService, request: Request, handle: Handle) -> AsyncIterator[dict]:
    sequence = handle.sequence
    async for piece in _stream(hub, request, handle):
        yield {"text": piece}
    if sequence.finished:
        yield {"finish_reason": sequence.finish_reason, "usage": _usage(sequence).model_dump(),
               "task": sequence.adapter.name, "version": sequence.adapter.version}


async def _openai(hub: HubService, metrics: ServerMetrics, request: Request, body, kind: str, source,
                  max_tokens: int | None):
    """Shared body of /v1/completions and /v1/chat/completions."""
    model = body.model
    params = hub.params(model, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        seed=body.seed, stop=body.stop, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos)
    handle = await hub.submit(model, source, params)
    sequence = handle.sequence
    metrics.requests.labels(task=model).inc()
    head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": f"{sequence.adapter.name}"}
    choice = (lambda text, finish: {"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish}) if kind == "chat.completion" else \
             (lambda text, finish: {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    if body.stream:
        return _sse(_openai_events(hub, request, handle, head, kind))
    text = await _complete(hub, request, handle)
    return {**head, "object": kind, "choices": [choice(text, _openai_finish(sequence))],
            "usage": {**_usage(sequence).model_dump(),
                      "total_tokens": len(sequence.prompt_ids) + len(sequence.output_ids)}}


def _openai_finish(sequence: Sequence) -> str:
    return "length" if sequence.finish_reason == "length" else "stop"


async def _openai_events(hub: HubService, request: Request, handle: Handle, head: dict, kind: str):
    sequence = handle.sequence
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
    async for piece in _stream(hub, request, handle):
        yield chunk(piece, None)
    if sequence.finished:
        yield chunk(None, _openai_finish(sequence))
        yield "[DONE]"
