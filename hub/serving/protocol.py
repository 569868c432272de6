"""The one serving interface the HTTP layer talks to, and the values it exchanges.

`HubService` implements it in this process; `server.ray.ingress.RemoteService` over Ray Serve replicas. A request
resolves its adapter version once at the edge (`resolve` → `TaskRef`) and carries it; the routes read a
`RequestResult`, never engine internals. Sentence-VAE operations are an optional capability (`vae`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from hub.serving.composition import Composition
from hub.serving.logprobs import TokenText
from hub.serving.sampling import SamplingParams, sampling_params
from hub.task import Task

Disconnected = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class TaskRef:
    """A served task as one request sees it: the version it was resolved to, and the task (layout, chat
    parsing, default length). `adapter` is the in-process adapter of exactly that version (None remotely).
    A composed request (`composition`) refers to its layout adapter here, to every member's version in
    `versions`, and in-process to the resolved `composed` adapters (`hub.serving.composition.ComposedAdapters`)."""

    name: str
    version: str
    task: Task
    adapter: Any = None
    composition: Composition | None = None
    versions: tuple[str, ...] = ()
    composed: Any = None


@dataclass
class RequestResult:
    """What the routes and the metrics read of a request, whichever backend decoded it."""

    task: str  # "base" for the plain model
    version: str
    task_type: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_tokens_dropped: int = 0
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    client: str = ""  # the API key's name that sent it (`SamplingParams.client`), for its quotas and counters
    logprobs: list[TokenText] | None = None  # per generated token, when asked
    prompt_logprobs: list[TokenText] | None = None  # per prompt token as the model saw it (echo), when asked
    composed: list[str] | None = None  # a composed request's adapters ("name@version"), in the block's order

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def request_params(task: TaskRef | None, **fields) -> SamplingParams:
    """A request's sampling fields (None: not given), defaulting to its task's length (every backend's `params`)."""
    return sampling_params(task.task.defaults.max_new_tokens if task else None, **fields)


def parse_chat(task: TaskRef, messages: list[dict]) -> Any:
    """Chat messages as the task's input (every backend's `parse_chat`)."""
    return task.task.parse_chat(messages)


class RequestHandle(Protocol):
    def result(self) -> RequestResult: ...


class ServingBackend(Protocol):
    """What `server.app.build_app` needs of a backend."""

    ready: bool
    on_finished: Callable[[RequestResult, str], None] | None
    vae: Any  # a `hub.serving.vae.VaeService`, or None where sentence-VAE routes are not served

    async def start(self) -> None: ...
    def stop(self) -> None: ...
    async def watch_store(self) -> None: ...
    def not_ready_reason(self) -> str | None: ...
    async def resolve(self, task: str, composition: Composition | None = None) -> TaskRef: ...
    def params(self, task: TaskRef | None, **fields) -> SamplingParams: ...
    def parse_chat(self, task: TaskRef, messages: list[dict]) -> Any: ...
    async def submit(self, task: TaskRef | None, source: Any, params: SamplingParams,
                     prompt_text: str | None = None) -> RequestHandle: ...
    def stream(self, handle: Any, disconnected: Disconnected) -> AsyncIterator[str]: ...
    async def complete(self, handle: Any, disconnected: Disconnected) -> str: ...
    def cancel(self, handle: Any) -> None: ...
    def task_names(self) -> list[str]: ...
    async def list_tasks(self) -> dict: ...
    def stats(self) -> Any: ...
    def resident_count(self) -> int: ...
    # Optional detail for /metrics: the adapters of held requests and the KV budget (`hub.serving.occupancy`),
    # and each adapter's tier; None where the backend cannot see them (Ray replicas report only their stats).
    def occupancy(self) -> Any: ...
    def adapter_tiers(self) -> dict[str, str] | None: ...
    async def reload(self) -> Any: ...
    def unload(self, name: str) -> None: ...
    async def store_call(self, fn: Callable, *args) -> Any: ...
