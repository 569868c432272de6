"""The OpenAI-compatible routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`) and vLLM's extras.

`model` names a task. Completions take a prompt as text, token ids, or a list of up to `MAX_PROMPTS` of either;
every prompt gets `n` choices, each its own sequence in the fused batch (choice `i * n + j` is prompt i's j-th).
Text prompts are a task's input (laid out by the task); token-id prompts are decoded as they are (what
lm-evaluation-harness sends). `logprobs` / `echo` / `top_logprobs` come from `hub.serving.logprobs`, the
penalties from `hub.serving.penalties`; `stream_options` adds usage chunks (OpenAI's `include_usage`, vLLM's
`continuous_usage_stats`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, model_validator

from hub.errors import HubError
from hub.serving.logprobs import TokenText
from hub.serving.protocol import RequestResult, ServingBackend, TaskRef
from hub.serving.sampling import (MAX_LOGPROBS, MAX_NGRAM, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_STOP_CHARS,
                                  MAX_STOP_STRINGS, MAX_TEMPERATURE, SEED_LIMIT, SamplingParams)
from hub.serving.sequence import TokenPrompt
from server.compose import COMPOSE_DESCRIPTION, Compose, resolve
from server.prometheus import ServerMetrics
from server.responses import GENERATION_ERRORS, STREAM_RESPONSE, error_responses
from server.streams import merged, sse

MAX_PROMPTS = 64  # prompts in one completions request
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # sequences one request may start (prompts x n)

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
Seed = Annotated[int, Field(ge=0, le=SEED_LIMIT - 1)]
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
TopN = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# OpenAI fields this server does not implement, with the values that ask for nothing (accepted and ignored).
UNSUPPORTED_OPENAI_FIELDS = {"best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {})}


class PenaltyFields(BaseModel):
    """Repetition controls shared by every generation route (OpenAI's and vLLM's names)."""

    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False,
                                      description="vLLM's: logits of seen tokens divided (positive) or multiplied")
    no_repeat_ngram_size: int = Field(0, ge=0, le=MAX_NGRAM, description="HF generate's: never repeat an n-gram "
                                                                          "of the output")
    min_tokens: int = Field(0, ge=0, description="vLLM's extra parameter: no EOS or stop before this many tokens")
    ignore_eos: bool = Field(False, description="vLLM's extra parameter: decode to max_tokens")

    def penalty_fields(self) -> dict:
        return self.model_dump(include=set(PenaltyFields.model_fields))


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class OpenAIRequest(PenaltyFields):
    """Fields shared by the OpenAI-compatible routes; `model` is the task name."""

    model: str
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StopString | StopList | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    compose: Compose | None = Field(None, description="the hub's extension: " + COMPOSE_DESCRIPTION + " (`model`)")

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported_fields(cls, data: Any) -> Any:
        """Answer 422 naming an OpenAI field this server does not implement rather than silently ignoring it."""
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED_OPENAI_FIELDS.items():
                if name in data and data[name] not in neutral:
                    raise ValueError(f"'{name}' is not supported by this server; leave it out")
        return data

    @model_validator(mode="after")
    def check_streaming(self) -> "OpenAIRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed with stream: true")
        if self.stream and self.wants_logprobs:
            raise ValueError("'logprobs' (and 'echo') are not available with stream: true; send stream: false")
        return self

    @property
    def wants_logprobs(self) -> bool:
        return False


class CompletionRequest(OpenAIRequest):
    prompt: Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | str | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt")
    echo: bool = False
    logprobs: TopN | None = None

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None or self.echo

    def prompts(self) -> list[str | TokenPrompt]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [TokenPrompt(tuple(int(p) for p in prompt))]  # type: ignore[arg-type]
        return [p if isinstance(p, str) else TokenPrompt(tuple(p)) for p in prompt if not isinstance(p, int)]


class TextPart(BaseModel):
    """A part of a message's content; only text parts are read."""

    model_config = {"extra": "allow"}
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def only_text(self) -> "TextPart":
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported: send text parts only")
        if self.text is None:
            raise ValueError("a text content part needs 'text'")
        return self


class ChatMessage(BaseModel):
    role: str
    content: str | Annotated[list[TextPart], Field(max_length=64)]

    def text_message(self) -> dict:
        content = self.content if isinstance(self.content, str) else "\n".join(p.text or "" for p in self.content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: TopN | None = None

    @model_validator(mode="after")
    def top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)


# -- requests -------------------------------------------------------------------------------------------------
class Choices:
    """The sequences of one OpenAI request: every prompt's `n` choices, submitted all or none."""

    def __init__(self, hub: ServingBackend, request: Request, ref: TaskRef):
        self.hub, self.request, self.ref = hub, request, ref
        self.handles: list = []

    async def submit(self, sources: list, params: list[SamplingParams]) -> None:
        try:
            for source in sources:
                for p in params:
                    self.handles.append(await self.hub.submit(self.ref, source, p))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for handle in self.handles:
            self.hub.cancel(handle)

    async def complete(self) -> list[str]:
        try:
            return list(await asyncio.gather(*(self.hub.complete(h, self.request.is_disconnected)
                                               for h in self.handles)))
        except BaseException:
            self.cancel()
            raise

    def streams(self) -> list[AsyncIterator[str]]:
        return [self.hub.stream(h, self.request.is_disconnected) for h in self.handles]

    def results(self) -> list[RequestResult]:
        return [h.result() for h in self.handles]


def choice_params(hub: ServingBackend, ref: TaskRef, body: OpenAIRequest, max_tokens: int | None,
                  **fields) -> list[SamplingParams]:
    """Each of a prompt's `n` choices' settings: the same, but a seeded request's j-th choice has seed + j."""
    seeds = [None if body.seed is None else (body.seed + j) % SEED_LIMIT for j in range(body.n)]
    return [hub.params(ref, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed,
                       stop=body.stop, **body.penalty_fields(), **fields) for seed in seeds]


def usage(results: list[RequestResult]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    dropped = sum(r.input_tokens_dropped for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_dropped": dropped}


def warnings(results: list[RequestResult]) -> list[str]:
    return [f"the input was too long: {r.input_tokens_dropped} of its tokens were cut to fit the {r.task_type} "
            f"task's limits (the model saw {r.prompt_tokens} tokens)" for r in results if r.input_tokens_dropped]


def finish(result: RequestResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def completion_logprobs(tokens: list[TokenText], start: int = 0) -> dict:
    """OpenAI's legacy `logprobs` object; `text_offset` counts characters of the choice's text."""
    offsets, at = [], start
    for token in tokens:
        offsets.append(at)
        at += len(token.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) if t.logprob is not None else None for t in tokens],
            "text_offset": offsets}


def chat_logprobs(tokens: list[TokenText], top: int) -> dict:
    def entry(token: str, logprob: float | None) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(s, v) for s, v in t.top[:top]]}
                        for t in tokens]}


def generate_logprobs(result: RequestResult) -> dict:
    """/v1/generate's `logprobs` and `prompt_logprobs`: one object per token."""
    def entries(tokens: list[TokenText] | None) -> list[dict] | None:
        if tokens is None:
            return None
        return [{"token": t.token, "logprob": t.logprob, "top_logprobs": dict(t.top) if t.logprob is not None
                 else None} for t in tokens]

    return {"logprobs": entries(result.logprobs), "prompt_logprobs": entries(result.prompt_logprobs)}


def echo_text(source: str | TokenPrompt, result: RequestResult) -> str:
    """A prompt as echoed: the text sent, or the text of the token ids sent."""
    if isinstance(source, str):
        return source
    return "".join(t.token for t in result.prompt_logprobs or [])


def completion_choice(index: int, text: str, result: RequestResult, body: CompletionRequest,
                      source: str | TokenPrompt) -> dict:
    echoed = echo_text(source, result) if body.echo else ""
    tokens = (result.prompt_logprobs or []) if body.echo else []
    tokens = tokens + (result.logprobs or [])
    logprobs = completion_logprobs(tokens) if body.logprobs is not None else None
    return {"index": index, "text": echoed + text, "logprobs": logprobs, "finish_reason": finish(result)}


def chat_choice(index: int, text: str, result: RequestResult, body: ChatCompletionRequest) -> dict:
    logprobs = chat_logprobs(result.logprobs or [], body.top_logprobs or 0) if body.logprobs else None
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish(result)}


def head(kind: str, ref: TaskRef) -> dict:
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": ref.name}


# -- streaming --------------------------------------------------------------------------------------------------
async def stream_events(choices: Choices, kind: str, top: dict, options: StreamOptions | None) -> AsyncIterator[dict]:
    """Chunks of every choice as they come (each with its index), a finish chunk per choice, then with
    `include_usage` a usage chunk with no choices; `continuous_usage_stats` puts the usage so far in every chunk."""
    chat = kind == "chat.completion"
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    options = options or StreamOptions()

    def chunk(index: int, text: str | None, finish_reason: str | None) -> dict:
        if chat:
            choice = {"index": index, "delta": {"content": text} if text is not None else {},
                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        event = {**top, "object": chunk_kind, "choices": [choice]}
        if options.continuous_usage_stats:
            event["usage"] = usage(choices.results())
        return event

    if chat:
        for index in range(len(choices.handles)):
            yield {**top, "object": chunk_kind, "choices": [
                {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    async for index, piece in merged(choices.streams()):
        if piece is not None:
            yield chunk(index, piece, None)
            continue
        result = choices.handles[index].result()
        if result.finished:
            yield chunk(index, None, finish(result))
    if options.include_usage:
        yield {**top, "object": chunk_kind, "choices": [], "usage": usage(choices.results())}


# -- routes -----------------------------------------------------------------------------------------------------
def openai_router(hub: ServingBackend, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()
    responses: dict[int | str, Any] = {200: STREAM_RESPONSE[200], **error_responses(*GENERATION_ERRORS)}

    async def run(body: OpenAIRequest, request: Request, ref: TaskRef, kind: str, sources: list,
                  params: list[SamplingParams], make_choice) -> Any:
        if len(sources) * body.n > MAX_CHOICES:
            raise HubError(f"n ({body.n}) times the number of prompts ({len(sources)}) is over {MAX_CHOICES}")
        choices = Choices(hub, request, ref)
        await choices.submit(sources, params)
        metrics.requests.labels(task=ref.name).inc(len(choices.handles))
        top = head(kind, ref)
        if body.stream:
            return sse(stream_events(choices, kind, top, body.stream_options), openai=True)
        texts = await choices.complete()
        results = choices.results()
        return {**top, "object": kind, "usage": usage(results), "warnings": warnings(results),
                "choices": [make_choice(i, text, result, sources[i // body.n])
                            for i, (text, result) in enumerate(zip(texts, results))]}

    @router.post("/v1/completions", responses=responses)
    async def completions(body: CompletionRequest, request: Request):
        if body.max_tokens == 0 and not body.echo:
            raise HubError("max_tokens 0 is allowed only with echo: true (score the prompt)")
        ref = await resolve(hub, body.model, body.compose)
        prompt_logprobs = (body.logprobs or 0) if body.echo else None
        params = choice_params(hub, ref, body, body.max_tokens, logprobs=body.logprobs,
                               prompt_logprobs=prompt_logprobs)
        return await run(body, request, ref, "text_completion", body.prompts(), params,
                         lambda i, text, result, source: completion_choice(i, text, result, body, source))

    @router.post("/v1/chat/completions", responses=responses)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        ref = await resolve(hub, body.model, body.compose)
        source = hub.parse_chat(ref, [m.text_message() for m in body.messages])
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = choice_params(hub, ref, body, body.max_completion_tokens or body.max_tokens, logprobs=logprobs)
        return await run(body, request, ref, "chat.completion", [source], params,
                         lambda i, text, result, _: chat_choice(i, text, result, body))

    @router.get("/v1/models")
    async def models():
        listing = await hub.list_tasks()
        return {"object": "list", "data": [
            {"id": task["name"], "object": "model", "created": int(time.time()), "owned_by": "adapter-hub",
             "root": task["name"], "parent": task.get("parent"), "version": task.get("version")}
            for task in listing["tasks"]]}

    return router

