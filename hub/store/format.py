"""The schema of an adapter's metadata: `adapter_meta.json` in a run export, `hub.json` in the store.

`AdapterMeta.from_dict` validates every field the hub reads and raises `IntegrityError` naming the file and the
field; keys it does not know are kept in `extra` and written back unchanged, so other tools (and later versions
of the hub) may add optional fields without breaking readers. The store-only fields (`version`, `created_at`,
`files`) are None/empty in a run export.

Which fields are required depends on `adapter_kind` (`hub.store.kinds.StoredKind`, registered by each kind): a
kind with task tokens (the VLM, the default kind) needs its task's `task_config`, `special_tokens` and `eos_token`;
a kind without (a sentence VAE) has those default to empty, and may require fields of its own (a VAE's `vae`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Mapping

from hub.errors import IntegrityError
from hub.store.kinds import StoredKind, stored_kind

FINGERPRINT_KEYS = ("model_type", "n_layer", "n_embd", "n_head", "vocab_size", "weights_sha256")
_FINGERPRINT_INTS = ("n_layer", "n_embd", "n_head", "vocab_size")
_STORE_FIELDS = ("version", "created_at", "files")
_OPTIONAL_FIELDS = ("adapter_kind", "layout", "vae", "max_length")  # absent before the field existed
DEFAULT_KIND = "vlm"  # the kind of metadata written before `adapter_kind` existed (`hub.adapters.vlm`)
_TASK_TOKEN_FIELDS = ("task_config", "special_tokens", "eos_token")  # what a kind without task tokens may omit


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


def _thaw(value: Any) -> Any:
    """Plain JSON-ready values from the read-only mappings and tuples kept in an AdapterMeta."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON true is not a number here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass(frozen=True)
class AdapterMeta:
    """One adapter version's metadata, validated. `backbone` is the fingerprint of the GPT-2 it was trained on."""

    name: str
    task_type: str
    task_config: Mapping[str, Any]
    special_tokens: tuple[str, ...]
    eos_token: str
    bottleneck: int
    trainable_params: int
    trainable_pct: float
    metrics: Mapping[str, Any]
    backbone: Mapping[str, Any]
    adapter_kind: str = DEFAULT_KIND  # `hub.adapters.registry` name of the kind whose bundle this version holds
    layout: Mapping[str, Any] | None = None  # how prompts and token types are built (`hub.interop.prompt_layout`)
    vae: Mapping[str, Any] | None = None  # a sentence VAE's `VAEConfig` (required for that kind, else None)
    max_length: int | None = None  # the longest sentence in tokens a sentence VAE was trained on
    version: str | None = None
    created_at: str | None = None
    files: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    extra: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))

    @classmethod
    def from_dict(cls, data: Any, where: str, stored: bool = False) -> "AdapterMeta":
        """Validate `data` (parsed JSON of file `where`); `stored` also requires the store-only fields."""
        if not isinstance(data, dict):
            raise IntegrityError(f"{where} must hold a JSON object")
        known = {f.name for f in fields(cls)} - {"extra"}
        kind = _kind_of(data, where)
        optional = (*_OPTIONAL_FIELDS, *(() if kind.has_task_tokens else _TASK_TOKEN_FIELDS))
        required = [k for k in known if (k not in _STORE_FIELDS or stored) and k not in optional]
        missing = sorted(k for k in [*required, *kind.required_fields] if k not in data)
        if missing:
            raise IntegrityError(f"{where} lacks {', '.join(missing)}")
        if not kind.has_task_tokens:
            data = {"task_config": {}, "special_tokens": [], "eos_token": "", **data}
        problems = _field_problems(data, stored) + _token_problems(data, kind) + kind.meta_problems(data)
        if problems:
            raise IntegrityError(f"{where}: {'; '.join(problems)}")
        return cls(
            name=data["name"], task_type=data["task_type"], task_config=_frozen(data["task_config"]),
            special_tokens=tuple(data["special_tokens"]), eos_token=data["eos_token"],
            bottleneck=data["bottleneck"], trainable_params=data["trainable_params"],
            trainable_pct=float(data["trainable_pct"]), metrics=_frozen(data["metrics"]),
            backbone=_frozen(data["backbone"]), adapter_kind=kind.name,
            layout=_frozen(data["layout"]) if data.get("layout") is not None else None,
            vae=_frozen(data["vae"]) if data.get("vae") is not None else None, max_length=data.get("max_length"),
            version=data.get("version"), created_at=data.get("created_at"),
            files=_frozen(data.get("files", {})),
            extra=_frozen({k: v for k, v in data.items() if k not in known}),
        )

    @classmethod
    def unpublished(cls, name: str, task_type: str, special_tokens: tuple[str, ...], bottleneck: int) -> "AdapterMeta":
        """Metadata of an adapter built in memory (benchmarks, tests): no metrics, no recorded backbone."""
        return cls(name=name, task_type=task_type, task_config=_frozen({}), special_tokens=tuple(special_tokens),
                   eos_token=special_tokens[-1], bottleneck=bottleneck, trainable_params=0, trainable_pct=0.0,
                   metrics=_frozen({}), backbone=_frozen({}))

    @property
    def has_task_tokens(self) -> bool:
        """Whether this version's bundle holds task-token rows (its kind's `StoredKind.has_task_tokens`)."""
        return stored_kind(self.adapter_kind).has_task_tokens

    def to_dict(self) -> dict[str, Any]:
        """The JSON object to write: unknown keys first, then every field (store-only ones when set)."""
        data = _thaw(self.extra)
        for f in fields(self):
            unset = (f.name in _STORE_FIELDS and not getattr(self, f.name)) or getattr(self, f.name) is None
            if f.name != "extra" and not unset:
                data[f.name] = _thaw(getattr(self, f.name))
        return data

    def stored_as(self, name: str, version: str, created_at: str, files: Mapping[str, str]) -> "AdapterMeta":
        """This metadata as the store records it for `name@version`."""
        return replace(self, name=name, version=version, created_at=created_at, files=_frozen(files))

    def with_metrics(self, metrics: Mapping[str, Any]) -> "AdapterMeta":
        """Metrics merged in (new keys win)."""
        return replace(self, metrics=_frozen({**self.metrics, **metrics}))


def _field_problems(data: dict, stored: bool) -> list[str]:
    """Every type or value problem of the known fields, as short phrases naming the field."""
    problems = []
    for key in ("name", "task_type", "adapter_kind"):
        if not isinstance(data.get(key, "-"), str) or not data.get(key, "-"):
            problems.append(f"{key} must be a non-empty string")
    for key in ("task_config", "metrics"):
        if not isinstance(data[key], dict):
            problems.append(f"{key} must be an object")
    for key in ("layout", "vae"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            problems.append(f"{key} must be an object")
    if data.get("max_length") is not None and (not is_int(data["max_length"]) or data["max_length"] < 1):
        problems.append("max_length must be a positive integer")
    if not is_int(data["bottleneck"]) or data["bottleneck"] < 1:
        problems.append("bottleneck must be a positive integer")
    if not is_int(data["trainable_params"]) or data["trainable_params"] < 0:
        problems.append("trainable_params must be a non-negative integer")
    if not _is_number(data["trainable_pct"]) or data["trainable_pct"] < 0:
        problems.append("trainable_pct must be a non-negative number")
    problems += _fingerprint_problems(data["backbone"])
    if stored:
        problems += _store_problems(data)
    return problems


def _kind_of(data: dict, where: str) -> StoredKind:
    """The registered kind `data` names (the default kind when it names none, or no string: reported later)."""
    name = data.get("adapter_kind", DEFAULT_KIND)
    try:
        return stored_kind(name if isinstance(name, str) and name else DEFAULT_KIND)
    except IntegrityError as err:
        raise IntegrityError(f"{where}: {err}") from None


def _token_problems(data: dict, kind: StoredKind) -> list[str]:
    return _task_token_problems(data) if kind.has_task_tokens else _no_task_token_problems(data, kind.name)


def _task_token_problems(data: dict) -> list[str]:
    """A kind with task tokens: at least two special tokens, the eos token one of them."""
    tokens, eos = data["special_tokens"], data["eos_token"]
    problems = [] if isinstance(eos, str) and eos else ["eos_token must be a non-empty string"]
    if not isinstance(tokens, list) or len(tokens) < 2 or not all(isinstance(t, str) and t for t in tokens):
        problems.append("special_tokens must be a list of at least two non-empty strings")
    elif not problems and eos not in tokens:
        problems.append(f"eos_token {eos!r} is not one of special_tokens")
    return problems


def _no_task_token_problems(data: dict, kind: str) -> list[str]:
    """A kind without task tokens: none listed, and the eos token (the backbone's) a string."""
    problems = []
    if data["special_tokens"]:
        problems.append(f"a {kind} version has no special_tokens")
    if not isinstance(data["eos_token"], str):
        problems.append("eos_token must be a string")
    return problems


def _fingerprint_problems(backbone: Any) -> list[str]:
    if not isinstance(backbone, dict) or any(k not in backbone for k in FINGERPRINT_KEYS):
        return [f"backbone must be a fingerprint with {', '.join(FINGERPRINT_KEYS)}"]
    if not all(is_int(backbone[k]) and backbone[k] > 0 for k in _FINGERPRINT_INTS):
        return [f"backbone's {', '.join(_FINGERPRINT_INTS)} must be positive integers"]
    if not isinstance(backbone["weights_sha256"], str) or not isinstance(backbone.get("source", ""), str):
        return ["backbone's weights_sha256 and source must be strings"]
    return []


def _store_problems(data: dict) -> list[str]:
    problems = []
    for key in ("version", "created_at"):
        if not isinstance(data[key], str) or not data[key]:
            problems.append(f"{key} must be a non-empty string")
    files = data["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        problems.append("files must map file names to sha256 strings")
    return problems
