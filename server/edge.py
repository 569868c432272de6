"""Bounds at the edge: every request body is checked before a route (or the JSON parser of FastAPI) sees it.

`BodyGuard` is ASGI middleware. It answers 413 for a body over `max_body_bytes` (from Content-Length, before
reading, or while reading a chunked body) and 422 for a body that is not strict JSON: NaN/Infinity, numbers that
overflow to infinity, nesting deeper than `max_depth`, lone surrogates (invalid Unicode that tokenizers and
encoders choke on), invalid UTF-8. Every answer is a JSON object `{"detail": message}` that states the limit.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_DEPTH = 32
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodyProblem(ValueError):
    """Why a body is refused, and with which status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _refuse_constant(name: str) -> Any:
    raise BodyProblem(422, f"{name} is not a JSON number; send finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyProblem(422, f"the number {text[:32]} is out of range; send finite numbers only")
    return value


def _check_values(document: Any, max_depth: int) -> None:
    """Depth and string checks without recursion (the document may be deep)."""
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise BodyProblem(422, f"the JSON body is nested deeper than {max_depth} levels")
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(value, str) and not value.isascii() and _LONE_SURROGATE.search(value):
            raise BodyProblem(422, "a string in the body holds a lone UTF-16 surrogate (such as \\ud800), "
                                   "which is not valid Unicode")


def check_json_body(body: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Raise BodyProblem unless `body` is empty or strict JSON within the depth limit."""
    if not body.strip():
        return
    try:
        document = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except BodyProblem:
        raise
    except RecursionError:
        raise BodyProblem(422, f"the JSON body is nested deeper than {max_depth} levels") from None
    except ValueError as err:  # JSONDecodeError, invalid UTF-8, integers too long to convert
        raise BodyProblem(422, f"the body is not valid JSON: {str(err)[:200]}") from None
    _check_values(document, max_depth)


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyGuard:
    """ASGI middleware bounding request bodies (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_depth: int = DEFAULT_MAX_DEPTH):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        try:
            self._check_declared_length(scope)
            body = await self._read(receive)
            if body is None:
                return  # the client left
            check_json_body(body, self.max_depth)
        except BodyProblem as problem:
            return await _answer(send, problem.status, str(problem))
        await self.app(scope, _replay(body, receive), send)

    def _check_declared_length(self, scope: Scope) -> None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is None:
            return
        if not declared.isdigit():
            raise BodyProblem(400, "Content-Length must be a whole number of bytes")
        if int(declared) > self.max_body_bytes:
            raise BodyProblem(413, self._too_large())

    async def _read(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyProblem(413, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> str:
        return f"the request body is larger than the limit of {self.max_body_bytes} bytes (--max-body-bytes)"


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then the client's own messages (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
