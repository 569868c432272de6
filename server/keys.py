"""The keys file of `hub serve --keys keys.toml`: API keys by the SHA-256 of their secret, each with the tasks it
may call, whether it may administer the hub, and its quotas. `hub keys add` writes entries; the server never
sees or logs a secret, only its digest.

    [keys.team-a]
    sha256 = "3b5d…"                 # hub keys add prints the key once and stores only this
    tasks = ["e2e", "summarize-*"]   # names or shell-style globs ("*": every task)
    admin = false                    # may call /v1/admin/* (reload, unload)
    requests_per_second = 5          # token bucket (burst: one second's worth, at least 1); absent: unlimited
    tokens_per_minute = 20000        # prompt + completion tokens (burst: one minute's worth); absent: unlimited

Keys are random (`hub-` + 43 URL-safe characters, 256 bits), so an unsalted SHA-256 is as good as a slow hash
and lets the server find a key by its digest in one lookup.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from hub.errors import HubError

KEY_PREFIX = "hub-"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DIGEST = re.compile(r"[0-9a-f]{64}")
FIELDS = {"sha256", "tasks", "admin", "requests_per_second", "tokens_per_minute"}


class KeysFileError(HubError):
    """The keys file cannot be used (the message names the entry and field, never a secret)."""


@dataclass(frozen=True)
class KeySpec:
    name: str
    sha256: str
    tasks: tuple[str, ...]
    admin: bool = False
    requests_per_second: float | None = None
    tokens_per_minute: float | None = None

    def may_use(self, task: str) -> bool:
        return any(fnmatchcase(task, pattern) for pattern in self.tasks)

    def as_entry(self) -> dict[str, Any]:
        entry = {k: v for k, v in asdict(self).items() if k != "name" and v is not None}
        return {**entry, "tasks": list(self.tasks)}

    def to_toml(self) -> str:
        lines = [f"[keys.{self.name}]", f'sha256 = "{self.sha256}"',
                 f"tasks = [{', '.join(json.dumps(t) for t in self.tasks)}]", f"admin = {str(self.admin).lower()}"]
        for field in ("requests_per_second", "tokens_per_minute"):
            value = getattr(self, field)
            if value is not None:
                lines.append(f"{field} = {value:g}")
        return "\n".join(lines) + "\n"


def digest(secret: str) -> str:
    """The SHA-256 (hex) a keys file stores for a key; any header value is safe to pass."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_keys(text: str) -> dict[str, KeySpec]:
    """Keys by digest; KeysFileError naming the first problem."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise KeysFileError(f"the keys file is not valid TOML: {err}") from None
    unknown = sorted(document.keys() - {"keys"})
    if unknown:
        raise KeysFileError(f"the keys file holds only [keys.NAME] tables; unknown: {', '.join(unknown)}")
    entries = document.get("keys", {})
    specs: dict[str, KeySpec] = {}
    for name, entry in entries.items():
        spec = _spec(name, entry)
        if spec.sha256 in specs:
            raise KeysFileError(f"keys {specs[spec.sha256].name!r} and {name!r} have the same secret")
        specs[spec.sha256] = spec
    return specs


def _spec(name: str, entry: Any) -> KeySpec:
    where = f"key {name!r}"
    if not NAME.fullmatch(name):
        raise KeysFileError(f"{where}: a name is 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(entry, dict):
        raise KeysFileError(f"{where}: expected a table [keys.{name}]")
    unknown = sorted(entry.keys() - FIELDS)
    if unknown:
        raise KeysFileError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not DIGEST.fullmatch(sha):
        raise KeysFileError(f"{where}: sha256 must be 64 lowercase hex digits (`hub keys hash` prints it)")
    tasks = entry.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise KeysFileError(f"{where}: tasks must be a list of task names or globs")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise KeysFileError(f"{where}: admin must be true or false")
    return KeySpec(name, sha, tuple(tasks), admin, _rate(where, entry, "requests_per_second"),
                   _rate(where, entry, "tokens_per_minute"))


def _rate(where: str, entry: dict, field: str) -> float | None:
    value = entry.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise KeysFileError(f"{where}: {field} must be a positive number (leave it out for no limit)")
    return float(value)


def read_keys(path: Path) -> dict[str, KeySpec]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise KeysFileError(f"cannot read the keys file {path}: {err}") from None
    return parse_keys(text)


def write_keys(path: Path, specs: list[KeySpec]) -> None:
    """Replace the file atomically (a server watching it never reads half of it); owner-readable only."""
    text = "# API keys of `hub serve --keys` (docs/TENANTS.md); written by `hub keys`\n\n" + \
        "\n".join(spec.to_toml() for spec in sorted(specs, key=lambda s: s.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_key(path: Path, spec: KeySpec) -> None:
    specs = read_keys(path) if path.exists() else {}
    if any(s.name == spec.name for s in specs.values()):
        raise KeysFileError(f"a key named {spec.name!r} exists; remove it first (`hub keys remove`)")
    _spec(spec.name, spec.as_entry())  # the same checks as when read
    write_keys(path, [*specs.values(), spec])


def remove_key(path: Path, name: str) -> None:
    specs = list(read_keys(path).values())
    if not any(s.name == name for s in specs):
        raise KeysFileError(f"no key named {name!r} in {path}")
    write_keys(path, [s for s in specs if s.name != name])
