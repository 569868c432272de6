"""HTTP layer: FastAPI routes and their schemas over `hub.serving.service.HubService`.

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
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, StringConstraints, model_validator

from hub.adapters.registry import kind_specs
from hub.adapters.spec import load_hook
from hub.errors import CapacityError, HubError, NotFoundError, UnavailableError
from hub.model.backbone import Backbone
from hub.serving.protocol import RequestResult, ServingBackend, TaskRef
from hub.serving.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE, SEED_LIMIT
from hub.serving.service import GenerationFailedError, HubService, RequestTimeoutError, ServiceSettings
from hub.store.protocol import Store
from server.edge import DEFAULT_MAX_BODY_BYTES, BodyGuard
from server.responses import ADMIN_ERRORS, GENERATION_ERRORS, STREAM_RESPONSE, error_responses
from server.playground import add_playground, training_curve_url
from server.prometheus import ServerMetrics
from tasks import make_task

log = logging.getLogger("hub.server")


# -- schemas ----------------------------------------------------------------------------------------------------
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
Seed = Annotated[int, Field(ge=0, le=SEED_LIMIT - 1)]
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
# OpenAI fields this server does not implement, with the values that ask for nothing (accepted and ignored).
UNSUPPORTED_OPENAI_FIELDS = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                             "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0),
                             "frequency_penalty": (None, 0), "logit_bias": (None, {})}


class GenerateRequest(BaseModel):
    task: str = Field(..., description="adapter name")
    input: str | dict = Field(..., description="the task input (text, or an object for structured tasks)")
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: int = Field(0, ge=0)
    seed: Seed | None = None
    stop: StopList = Field(default_factory=list)
    min_tokens: int = Field(0, ge=0, description="no EOS or stop string before this many tokens (vLLM)")
    ignore_eos: bool = Field(False, description="decode to max_new_tokens whatever EOS says (vLLM)")
    stream: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    input_tokens_dropped: int = Field(0, description="tokens cut from a too-long input by a task that truncates "
                                                     "(summarize, coqa, persona); other tasks refuse with 422")


class GenerateResponse(BaseModel):
    task: str
    version: str
    text: str
    finish_reason: str
    usage: Usage
    warnings: list[str] = Field(default_factory=list)


class OpenAIRequest(BaseModel):
    """Fields shared by the OpenAI-compatible routes; `model` is the task name."""

    model: str
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: Literal[1] = 1
    stop: StopString | StopList | None = None
    stream: bool = False
    seed: Seed | None = None
    min_tokens: int = Field(0, ge=0, description="vLLM's extra parameter: no EOS or stop before this many tokens")
    ignore_eos: bool = Field(False, description="vLLM's extra parameter: decode to max_tokens")

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported_fields(cls, data: Any) -> Any:
        """Answer 422 naming an OpenAI field this server does not implement rather than silently ignoring it."""
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED_OPENAI_FIELDS.items():
                if name in data and data[name] not in neutral:
                    raise ValueError(f"'{name}' is not supported by this server; leave it out")
        return data


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
def _issues(err: RequestValidationError) -> list[dict]:
    """Validation errors as JSON-safe issues: no echo of the input (it may hold NaN or invalid Unicode)."""
    def safe(value: Any) -> int | str:
        return value if isinstance(value, int) else str(value).encode("utf-8", "backslashreplace").decode()

    return [{"loc": [safe(part) for part in e.get("loc", ())], "msg": safe(e.get("msg", "invalid")),
             "type": safe(e.get("type", "value_error"))} for e in err.errors()]


NO_VAE_NOTE = ("The sentence-VAE routes (/v1/vae/{task}/...) are not served by this backend (hub serve --ray): "
               "use `hub serve` without --ray for sentence VAEs.")


def create_app(backbone: Backbone, store: Store, settings: ServiceSettings | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    return build_app(HubService(backbone, store, make_task, settings), max_body_bytes)


def build_app(hub: ServingBackend, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              metrics: ServerMetrics | None = None) -> FastAPI:
    """The routes over a backend: `HubService` in this process, or `server.ray.ingress.RemoteService`."""
    metrics = metrics or ServerMetrics()
    hub.on_finished = metrics.observe_finished

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await hub.start()
        watch = asyncio.create_task(hub.watch_store())
        yield
        watch.cancel()
        await run_in_threadpool(hub.stop)  # drains running and waiting sequences

    app = FastAPI(title="GPT-2 adapter hub", lifespan=lifespan, description="" if hub.vae else NO_VAE_NOTE)
    app.add_middleware(BodyGuard, max_body_bytes=max_body_bytes)
    app.state.hub = hub
    for kind in kind_specs():  # each kind's routes, where it has some and the backend serves them
        router = load_hook(kind.http_router)(hub) if kind.http_router else None
        if router is not None:
            app.include_router(router)
    add_playground(app, hub.store)

    @app.exception_handler(HubError)
    async def hub_error(request: Request, err: HubError):
        if isinstance(err, CapacityError):
            return JSONResponse({"detail": str(err)}, status_code=429, headers={"Retry-After": "1"})
        return JSONResponse({"detail": str(err)}, status_code=_status(err))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        return JSONResponse({"detail": _issues(err)}, status_code=422)

    @app.get("/healthz")
    @app.get("/health")  # vLLM's and TGI's name, which clients such as GuideLLM check first
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses=error_responses(503))
    async def readyz():
        reason = hub.not_ready_reason()
        if reason is not None:
            raise HTTPException(503, reason)
        return {"status": "ready", "tasks": len(hub.task_names())}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics_route():
        return Response(metrics.render(hub.stats(), hub.resident_count(), hub.not_ready_reason() is None),
                        media_type=metrics.content_type)

    @app.get("/v1/tasks", responses=error_responses(503))
    async def list_tasks():
        listing = await hub.list_tasks()
        return {**listing, "tasks": [{**task, "training_curve": training_curve_url(task["name"])}
                                     for task in listing["tasks"]]}

    @app.post("/v1/generate", response_model=GenerateResponse,
              responses={**STREAM_RESPONSE, **error_responses(*GENERATION_ERRORS)})
    async def generate(body: GenerateRequest, request: Request):
        ref = await hub.resolve(body.task)
        params = hub.params(ref, max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                            top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=body.stop,
                            min_tokens=body.min_tokens, ignore_eos=body.ignore_eos)
        handle = await hub.submit(ref, body.input, params)
        metrics.requests.labels(task=ref.name).inc()
        if body.stream:
            return _sse(_generate_events(hub, request, handle), openai=False)
        text = await _complete(hub, request, handle)
        result = handle.result()
        return GenerateResponse(task=result.task, version=result.version, text=text,
                                finish_reason=result.finish_reason or "cancelled", usage=_usage(result),
                                warnings=_warnings(result))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "adapter-hub"}
            for name in hub.task_names()]}

    @app.post("/v1/completions", responses={**STREAM_RESPONSE, **error_responses(*GENERATION_ERRORS)})
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt if isinstance(body.prompt, str) else _single(body.prompt)
        ref = await hub.resolve(body.model)
        return await _openai(hub, metrics, request, body, ref, "text_completion", prompt, body.max_tokens)

    @app.post("/v1/chat/completions", responses={**STREAM_RESPONSE, **error_responses(*GENERATION_ERRORS)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        ref = await hub.resolve(body.model)
        source = hub.parse_chat(ref, [m.model_dump() for m in body.messages])
        return await _openai(hub, metrics, request, body, ref, "chat.completion", source,
                             body.max_completion_tokens or body.max_tokens)

    def admin(authorization: str | None = Header(None)) -> None:
        token = os.environ.get("HUB_ADMIN_TOKEN")
        if not token:
            raise HTTPException(403, "admin routes are disabled: set HUB_ADMIN_TOKEN on the server")
        if not _bearer_matches(authorization, token):
            raise HTTPException(401, "missing or wrong 'Authorization: Bearer <HUB_ADMIN_TOKEN>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/admin/reload", dependencies=[Depends(admin)], responses=error_responses(*ADMIN_ERRORS))
    async def reload():
        changes = await hub.reload()
        return {"loaded": changes.loaded, "unloaded": changes.unloaded, "refused": changes.refused}

    @app.delete("/v1/admin/adapters/{name}", dependencies=[Depends(admin)],
                responses=error_responses(*ADMIN_ERRORS, 404))
    async def unload(name: str):
        await run_in_threadpool(hub.unload, name)
        return {"unloaded": name}

    return app


def _status(err: HubError) -> int:
    if isinstance(err, RequestTimeoutError):
        return 504
    if isinstance(err, GenerationFailedError):
        return 500
    if isinstance(err, UnavailableError):
        return 503
    return 404 if isinstance(err, NotFoundError) else 422


def _bearer_matches(authorization: str | None, token: str) -> bool:
    """`Bearer <token>`, the scheme in any case (RFC 7235); compared as bytes, so any header value is safe."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = credentials.strip().encode("utf-8", "surrogateescape")
    return secrets.compare_digest(given, token.encode("utf-8"))


def _stream(hub: ServingBackend, request: Request, handle) -> AsyncIterator[str]:
    return hub.stream(handle, request.is_disconnected)


async def _complete(hub: ServingBackend, request: Request, handle) -> str:
    return await hub.complete(handle, request.is_disconnected)


def _single(prompts: list[str]) -> str:
    if len(prompts) != 1:
        raise HubError("send one prompt per request (a list of exactly one string)")
    return prompts[0]


def _usage(result: RequestResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 input_tokens_dropped=result.input_tokens_dropped)


def _warnings(result: RequestResult) -> list[str]:
    if not result.input_tokens_dropped:
        return []
    return [f"the input was too long: {result.input_tokens_dropped} of its tokens were cut to fit the "
            f"{result.task_type} task's limits (the model saw {result.prompt_tokens} tokens)"]


def _sse_event(event: dict | str) -> str:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"


def _sse(events: AsyncIterator[dict], openai: bool) -> StreamingResponse:
    """A server-sent event stream. After the first byte the status line is gone, so an error becomes the last
    event, `{"error": {"message", "code"}}`; OpenAI routes always end with `[DONE]`."""
    async def encode():
        try:
            async for event in events:
                yield _sse_event(event)
        except Exception as err:  # the stream has started: report, whatever it is, in the stream
            status, message = (err.status_code, err.detail) if isinstance(err, HTTPException) else \
                (_status(err), str(err)) if isinstance(err, HubError) else (500, "generation failed")
            if status >= 500:
                log.error("stream ended by an error: %r", err)
            yield _sse_event({"error": {"message": message, "code": status}})
        if openai:
            yield _sse_event("[DONE]")

    return StreamingResponse(encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _generate_events(hub: ServingBackend, request: Request, handle) -> AsyncIterator[dict]:
    async for piece in _stream(hub, request, handle):
        yield {"text": piece}
    result = handle.result()
    if result.finished:
        yield {"finish_reason": result.finish_reason, "usage": _usage(result).model_dump(),
               "task": result.task, "version": result.version, "warnings": _warnings(result)}


async def _openai(hub: ServingBackend, metrics: ServerMetrics, request: Request, body, ref: TaskRef, kind: str,
                  source, max_tokens: int | None):
    """Shared body of /v1/completions and /v1/chat/completions."""
    params = hub.params(ref, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        seed=body.seed, stop=body.stop, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos)
    handle = await hub.submit(ref, source, params)
    metrics.requests.labels(task=ref.name).inc()
    head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": ref.name}
    choice = (lambda text, finish: {"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish}) if kind == "chat.completion" else \
             (lambda text, finish: {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    if body.stream:
        return _sse(_openai_events(hub, request, handle, head, kind), openai=True)
    text = await _complete(hub, request, handle)
    result = handle.result()
    return {**head, "object": kind, "choices": [choice(text, _openai_finish(result))],
            "usage": {**_usage(result).model_dump(), "total_tokens": result.prompt_tokens + result.completion_tokens},
            "warnings": _warnings(result)}


def _openai_finish(result: RequestResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


async def _openai_events(hub: ServingBackend, request: Request, handle, head: dict, kind: str):
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
    result = handle.result()
    if result.finished:
        yield chunk(None, _openai_finish(result))
