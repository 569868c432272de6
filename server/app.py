"""HTTP layer: FastAPI routes and their schemas over `hub.serving.service.HubService`.

Every published adapter is servable by name; requests for different tasks share one decode batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from hub.adapters.registry import kind_specs
from hub.adapters.spec import load_hook
from hub.errors import CapacityError, HubError
from hub.model.backbone import Backbone
from hub.serving.protocol import RequestResult, ServingBackend
from hub.serving.service import HubService, ServiceSettings
from hub.store.protocol import Store
from server.auth import Access, KeyRing, ScopedBackend
from server.compose import COMPOSE_DESCRIPTION, Compose, resolve
from server.edge import DEFAULT_MAX_BODY_BYTES, BodyGuard
from server.openai import PenaltyFields, Seed, StopList, Temperature, TopN, TopP, generate_logprobs, openai_router
from server.responses import ADMIN_ERRORS, GENERATION_ERRORS, STREAM_RESPONSE, error_responses, status_of
from server.streams import sse
from server.playground import add_playground, training_curve_url
from server.prometheus import ServerMetrics
from server.vllm_routes import vllm_router
from tasks import make_task

log = logging.getLogger("hub.server")


# -- schemas ----------------------------------------------------------------------------------------------------
class GenerateRequest(PenaltyFields):
    compose: Compose | None = Field(None, description=COMPOSE_DESCRIPTION)  # before `task`, which checks it
    task: str | None = Field(None, validate_default=True,
                             description="adapter name (with `compose`: the member whose prompt layout applies, by "
                                         "default the first)")
    input: str | dict = Field(..., description="the task input (text, or an object for structured tasks)")
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: int = Field(0, ge=0)
    seed: Seed | None = None
    stop: StopList = Field(default_factory=list)
    logprobs: TopN | None = Field(None, description="each generated token's log-probability and its top N")
    prompt_logprobs: TopN | None = Field(None, description="the same for the prompt's tokens")
    stream: bool = False

    @model_validator(mode="after")
    def no_logprobs_in_streams(self) -> "GenerateRequest":
        if self.stream and (self.logprobs is not None or self.prompt_logprobs is not None):
            raise ValueError("'logprobs' and 'prompt_logprobs' are not available with stream: true")
        return self

    @field_validator("task")
    @classmethod
    def task_or_composition(cls, task: str | None, info: ValidationInfo) -> str | None:
        if task is None and info.data.get("compose") is None:
            raise ValueError("name a 'task' (or several adapters in 'compose')")
        return task


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
    logprobs: list[dict] | None = None
    prompt_logprobs: list[dict] | None = None
    composed: list[str] | None = Field(None, description="a composed request's adapters (name@version), in order")


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
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, keys: Path | None = None) -> FastAPI:
    return build_app(HubService(backbone, store, make_task, settings), max_body_bytes, keys=keys)


def build_app(hub: ServingBackend, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              metrics: ServerMetrics | None = None, keys: Path | None = None) -> FastAPI:
    """The routes over a backend: `HubService` in this process, or `server.ray_serve.RemoteService`. With a
    keys file every route but health, metrics and the playground page needs an API key (`server.auth`)."""
    metrics = metrics or ServerMetrics()
    access = Access(KeyRing(keys), metrics.key_metrics) if keys else None
    hub.on_finished = _finished_observer(metrics, access)
    metrics.watch_tiers(hub)
    if access is not None:
        hub = ScopedBackend(hub, access)  # type: ignore[assignment]  # the backend as the calling key sees it

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await hub.start()
        watches = [asyncio.create_task(hub.watch_store()), *([asyncio.create_task(access.watch())] if access else [])]
        yield
        for watch in watches:
            watch.cancel()
        await run_in_threadpool(hub.stop)  # drains running and waiting sequences

    app = FastAPI(title="GPT-2 adapter hub", lifespan=lifespan, description="" if hub.vae else NO_VAE_NOTE,
                  dependencies=[Depends(access.guard)] if access else [])
    app.add_middleware(BodyGuard, max_body_bytes=max_body_bytes)
    app.state.hub = hub
    for kind in kind_specs():  # each kind's routes, where it has some and the backend serves them
        router = load_hook(kind.http_router)(hub) if kind.http_router else None
        if router is not None:
            app.include_router(router)
    app.include_router(openai_router(hub, metrics))
    add_playground(app, hub.store)

    @app.exception_handler(HubError)
    async def hub_error(request: Request, err: HubError):
        if isinstance(err, CapacityError):
            return JSONResponse({"detail": str(err)}, status_code=429, headers={"Retry-After": "1"})
        return JSONResponse({"detail": str(err)}, status_code=status_of(err))

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
        return Response(metrics.render(hub.stats(), hub.resident_count(), hub.not_ready_reason() is None,
                                       hub.occupancy()),
                        media_type=metrics.content_type)

    @app.get("/v1/tasks", responses=error_responses(503))
    async def list_tasks():
        listing = await hub.list_tasks()
        return {**listing, "tasks": [{**task, "training_curve": training_curve_url(task["name"])}
                                     for task in listing["tasks"]]}

    @app.post("/v1/generate", response_model=GenerateResponse,
              responses={**STREAM_RESPONSE, **error_responses(*GENERATION_ERRORS)})
    async def generate(body: GenerateRequest, request: Request):
        ref = await resolve(hub, body.task, body.compose)
        params = hub.params(ref, max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                            top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=body.stop,
                            logprobs=body.logprobs, prompt_logprobs=body.prompt_logprobs, **body.penalty_fields())
        handle = await hub.submit(ref, body.input, params)
        metrics.requests.labels(task=ref.name).inc()
        if body.stream:
            return sse(_generate_events(hub, request, handle), openai=False)
        text = await _complete(hub, request, handle)
        result = handle.result()
        return GenerateResponse(task=result.task, version=result.version, text=text,
                                finish_reason=result.finish_reason or "cancelled", usage=_usage(result),
                                warnings=_warnings(result), composed=result.composed, **generate_logprobs(result))

    def admin(authorization: str | None = Header(None)) -> None:
        if access is not None:
            return  # `access.guard` let only an admin key through
        token = os.environ.get("HUB_ADMIN_TOKEN")
        if not token:
            raise HTTPException(403, "admin routes are disabled: set HUB_ADMIN_TOKEN on the server")
        if not _bearer_matches(authorization, token):
            raise HTTPException(401, "missing or wrong 'Authorization: Bearer <HUB_ADMIN_TOKEN>'",
                                headers={"WWW-Authenticate": "Bearer"})

    app.include_router(vllm_router(hub, Depends(admin)))

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


def _finished_observer(metrics: ServerMetrics, access: Access | None):
    def observe(result: RequestResult, reason: str) -> None:
        metrics.observe_finished(result, reason)
        if access is not None:
            access.observe_finished(result)

    return observe


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


def _usage(result: RequestResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 input_tokens_dropped=result.input_tokens_dropped)


def _warnings(result: RequestResult) -> list[str]:
    if not result.input_tokens_dropped:
        return []
    return [f"the input was too long: {result.input_tokens_dropped} of its tokens were cut to fit the "
            f"{result.task_type} task's limits (the model saw {result.prompt_tokens} tokens)"]


async def _generate_events(hub: ServingBackend, request: Request, handle) -> AsyncIterator[dict]:
    async for piece in _stream(hub, request, handle):
        yield {"text": piece}
    result = handle.result()
    if result.finished:
        yield {"finish_reason": result.finish_reason, "usage": _usage(result).model_dump(),
               "task": result.task, "version": result.version, "warnings": _warnings(result),
               **({"composed": result.composed} if result.composed else {})}
