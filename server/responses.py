"""Error bodies and the OpenAPI entries of the statuses each route can answer (every 4xx/5xx has an `ErrorBody`)."""

from __future__ import annotations

from pydantic import BaseModel

from hub.errors import HubError, NotFoundError, UnavailableError
from hub.serving.service import GenerationFailedError, RequestTimeoutError


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a message, or for a request that does not match its schema, one issue per field."""

    detail: str | list[ValidationIssue]


def error_responses(*codes: int) -> dict:
    """OpenAPI entries for the error statuses a route can answer; every one has an `ErrorBody`."""
    descriptions = {400: "malformed request", 401: "missing or wrong admin token", 403: "admin routes disabled",
                    404: "unknown task or adapter", 413: "body over --max-body-bytes", 422: "invalid request",
                    429: "queue full or adapters busy (see Retry-After)", 500: "generation failed",
                    503: "starting, stopping, or the store did not answer", 504: "request timed out"}
    return {code: {"model": ErrorBody, "description": descriptions[code]} for code in codes}


BODY_ERRORS = (400, 413, 422)
GENERATION_ERRORS = (*BODY_ERRORS, 404, 429, 500, 503, 504)
ADMIN_ERRORS = (401, 403, 503)
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                         "description": "JSON, or server-sent events with `stream: true`"}}


def status_of(err: HubError) -> int:
    """The HTTP status of a `HubError` (capacity errors are 429 with Retry-After, in the app's handler)."""
    if isinstance(err, RequestTimeoutError):
        return 504
    if isinstance(err, GenerationFailedError):
        return 500
    if isinstance(err, UnavailableError):
        return 503
    return 404 if isinstance(err, NotFoundError) else 422
