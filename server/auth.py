"""API keys in the HTTP layer (`hub serve --keys keys.toml`): who calls (401), whether the key may use the task
(403, said the same way whether or not the task exists), and whether it is within its quotas (429 with
Retry-After). Enforced here, in front of any backend (`HubService` in process, `RemoteService` under Ray).

- `KeyRing`: the keys file, re-read when it changes (checked every `KEYS_POLL` seconds off the event loop); a
  file that no longer parses keeps the previous keys and is reported in the log (never a secret).
- `Quotas`: two token buckets per key, requests/s and tokens/min. A request is admitted while both hold
  credit; its prompt and completion tokens are charged when it ends, so a long request may take the token
  bucket below zero, and the key's next requests wait until it has refilled.
- `Access`: the app-wide dependency (`guard`): every route outside `OPEN_PATHS` needs a key, `/v1/admin/*` an
  admin key, and a route with a `{task}` or `{name}` in its path the key's scope and quota.
- `ScopedBackend`: the backend as a key sees it: `resolve` checks scope and quota before anything is said about
  the task, `submit` tags the request with the key's name (the runner's fairness, `hub.serving.fairness`), and
  the task listings behind `/v1/models` and `/v1/tasks` hold only what the key may use.

The key of the request being served is a context variable set by `guard` (an async dependency, so it runs in
the route's own context).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from hub.serving.composition import Composition
from hub.serving.protocol import RequestResult, ServingBackend, TaskRef
from hub.serving.sampling import SamplingParams
from server.keys import KeysFileError, KeySpec, digest, read_keys
from server.prometheus import KeyMetrics

log = logging.getLogger("hub.server.auth")

KEYS_POLL = 1.0  # seconds between checks of the keys file
OPEN_PATHS = frozenset({"/", "/playground", "/healthz", "/health", "/readyz", "/metrics", "/docs", "/redoc",
                        "/openapi.json", "/docs/oauth2-redirect"})
ADMIN_PREFIX = "/v1/admin/"
PATH_TASK_PARAMS = ("task", "name")

_caller: contextvars.ContextVar[KeySpec | None] = contextvars.ContextVar("hub_caller", default=None)


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class KeyRing:
    """The keys of a keys file, by digest; `watch` swaps in a changed file's keys (one assignment)."""

    def __init__(self, path: Path):
        self.path = path
        self.state = _file_state(path)
        self.keys: dict[str, KeySpec] = read_keys(path)  # at start-up a bad file stops the server
        self.reloads = 0

    def find(self, secret: str) -> KeySpec | None:
        return self.keys.get(digest(secret))

    async def watch(self, interval: float = KEYS_POLL) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.reload_if_changed()

    async def reload_if_changed(self) -> bool:
        state = await asyncio.to_thread(_file_state, self.path)
        if state == self.state:
            return False
        try:
            keys = await asyncio.to_thread(read_keys, self.path)
        except KeysFileError as err:
            log.warning("keeping the previous keys: %s", err)
            return False
        finally:
            self.state = state
        self.keys, self.reloads = keys, self.reloads + 1
        log.info("keys file reloaded: %d keys", len(keys))
        return True


class TokenBucket:
    """`rate` per second up to `capacity`; `level` may go below zero (tokens charged after the fact)."""

    def __init__(self, rate: float, capacity: float):
        self.rate, self.capacity = rate, capacity
        self.level, self.at = capacity, time.monotonic()

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
            self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0: now)."""
        return max(0.0, (amount - self.level) / self.rate)


class Quotas:
    """Each limited key's buckets, by key name; a changed limit starts a fresh bucket. Used from the event loop
    only, so no lock."""

    def __init__(self) -> None:
        self.buckets: dict[tuple[str, str], tuple[float, TokenBucket]] = {}

    def _bucket(self, key: str, kind: str, per_second: float | None, burst: float) -> TokenBucket | None:
        if per_second is None:
            self.buckets.pop((key, kind), None)
            return None
        held = self.buckets.get((key, kind))
        if held is None or held[0] != per_second:
            held = (per_second, TokenBucket(per_second, burst))
            self.buckets[key, kind] = held
        return held[1]

    def _of(self, spec: KeySpec) -> tuple[TokenBucket | None, TokenBucket | None]:
        rps, tpm = spec.requests_per_second, spec.tokens_per_minute
        return (self._bucket(spec.name, "requests", rps, max(1.0, rps or 0)),
                self._bucket(spec.name, "tokens", tpm / 60 if tpm else None, tpm or 0))

    def admit(self, spec: KeySpec) -> float:
        """Take one request from `spec`'s buckets; 0 when admitted, else the seconds to wait (nothing taken)."""
        now = time.monotonic()
        requests, tokens = self._of(spec)
        waits = []
        for bucket, amount in ((requests, 1.0), (tokens, math.ulp(0.0))):
            if bucket is not None:
                bucket.refill(now)
                waits.append(bucket.wait_for(amount))
        if any(waits):
            return max(waits)
        if requests is not None:
            requests.level -= 1
        return 0.0

    def charge_tokens(self, spec: KeySpec, count: int) -> None:
        _, tokens = self._of(spec)
        if tokens is not None:
            tokens.refill(time.monotonic())
            tokens.level -= count

    def forget_others(self, names: set[str]) -> None:
        """Drop the buckets of keys no longer in the file."""
        self.buckets = {k: v for k, v in self.buckets.items() if k[0] in names}


def _bearer(authorization: str | None) -> str | None:
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


@dataclass
class Access:
    """Keys, quotas and their counters, as the routes use them."""

    ring: KeyRing
    metrics: KeyMetrics
    quotas: Quotas = dataclasses.field(default_factory=Quotas)

    @property
    def caller(self) -> KeySpec | None:
        return _caller.get()

    async def guard(self, request: Request) -> None:
        """The app-wide dependency (see the module docstring)."""
        path = request.url.path
        if path in OPEN_PATHS:
            return
        spec = self.authenticate(request.headers.get("authorization"))
        _caller.set(spec)
        if path.startswith(ADMIN_PREFIX) and not spec.admin:
            self.metrics.refused(spec.name, "forbidden")
            raise HTTPException(403, "this key may not administer the hub (set admin = true for it)")
        for param in PATH_TASK_PARAMS:
            if param in request.path_params:
                self.use(str(request.path_params[param]))

    def authenticate(self, authorization: str | None) -> KeySpec:
        secret = _bearer(authorization)
        spec = self.ring.find(secret) if secret else None
        if spec is None:
            self.metrics.unauthorized.inc()
            raise unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'"
                               if secret is None else "the API key is not valid")
        return spec

    def use(self, *tasks: str) -> None:
        """The caller may use every one of `tasks` (a composition's adapters) now: 403 outside its scope, 429
        past its quota; counts one request."""
        spec = self.caller
        if spec is None:
            return
        for task in tasks:
            if not spec.may_use(task):
                self.metrics.refused(spec.name, "forbidden")
                raise HTTPException(403, f"this key may not use task {task!r}")
        wait = self.quotas.admit(spec)
        if wait > 0:
            self.metrics.refused(spec.name, "rate_limited")
            raise HTTPException(429, f"the key's quota is used up; retry in {math.ceil(wait)}s",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        self.metrics.admitted(spec.name)

    def visible(self, names: list[str]) -> list[str]:
        spec = self.caller
        return names if spec is None else [name for name in names if spec.may_use(name)]

    def observe_finished(self, result: RequestResult) -> None:
        """Charge a finished request's tokens to its key (the one in the file now, if it still is)."""
        if not result.client:
            return
        self.metrics.tokens(result.client, result.prompt_tokens, result.completion_tokens)
        spec = next((s for s in self.ring.keys.values() if s.name == result.client), None)
        if spec is not None:
            self.quotas.charge_tokens(spec, result.prompt_tokens + result.completion_tokens)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(KEYS_POLL)
            if await self.ring.reload_if_changed():
                self.quotas.forget_others({s.name for s in self.ring.keys.values()})


class ScopedBackend:
    """A backend as the calling key sees it (see the module docstring); everything else is the backend's."""

    def __init__(self, backend: ServingBackend, access: Access):
        self._backend, self._access = backend, access

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def resolve(self, task: str, composition: Composition | None = None) -> TaskRef:
        self._access.use(*(composition.tasks if composition else (task,)))
        return await self._backend.resolve(task, composition)

    def params(self, task: TaskRef | None, **fields) -> SamplingParams:
        """The request's settings, tagged with the calling key: every route's rows (sentence-VAE decodes too) are
        charged to it in fair admission and in its quotas."""
        params = self._backend.params(task, **fields)
        spec = self._access.caller
        return params if spec is None else dataclasses.replace(params, client=spec.name)

    def task_names(self) -> list[str]:
        return self._access.visible(self._backend.task_names())

    async def list_tasks(self) -> dict:
        listing = await self._backend.list_tasks()
        allowed = set(self._access.visible([t["name"] for t in listing["tasks"]]))
        spec = self._access.caller
        skipped = [s for s in listing.get("skipped", [])
                   if spec is None or spec.may_use(s["ref"].partition("@")[0])]
        return {**listing, "tasks": [t for t in listing["tasks"] if t["name"] in allowed], "skipped": skipped}
