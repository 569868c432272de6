"""The adapter store: versioned, checksummed, atomically published task adapters.

Layout: ``<root>/<name>/<version>/`` holds ``adapter_config.json``, ``adapter.safetensors``
(AdapterHub format, loadable by plain ``adapters``), ``task_tokens.safetensors`` (tensor
``rows`` [k, d]) and ``hub.json`` (the trainer's metadata plus ``name``, ``version``,
``created_at`` and the sha256 of every payload file). A sentence-VAE bundle (metadata
``adapter_kind: sentence_vae``, `hub.adapters.vae`) holds ``vae.safetensors`` and ``hub.json``. Directories starting with ``.``
(``.tmp-*`` staging, ``.trash-*`` removal) are internal and never listed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hub.errors import BackboneMismatchError, HubError, IntegrityError, NotFoundError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
TASK_TOKENS = "task_tokens.safetensors"
ADAPTER_META = "adapter_meta.json"
HUB_JSON = "hub.json"
EXPORT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TOKENS, ADAPTER_META)
# adapter_meta.json is not stored: hub.json carries its content.
PAYLOAD_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TOKENS)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

VAE_KIND = "sentence_vae"
VAE_WEIGHTS = "vae.safetensors"
KIND_PAYLOAD_FILES = {VAE_KIND: (VAE_WEIGHTS,)}  # adapter kind -> payload files; VLM adapters: PAYLOAD_FILES
VAE_REQUIRED_META = ("name", "task_type", "vae", "trainable_params", "trainable_pct", "metrics", "backbone")

REQUIRED_META = (
    "name", "task_type", "task_config", "special_tokens", "eos_token", "bottleneck",
    "trainable_params", "trainable_pct", "metrics", "backbone",
)
FINGERPRINT_KEYS = ("model_type", "n_layer", "n_embd", "n_head", "vocab_size", "weights_sha256")
LAYER_PARTS = {
    "adapter_down.0.weight": "ln_weight",
    "adapter_down.0.bias": "ln_bias",
    "adapter_down.1.weight": "down_weight",
    "adapter_down.1.bias": "down_bias",
    "adapter_up.weight": "up_weight",
    "adapter_up.bias": "up_bias",
}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_LEN = 64
MAX_PUBLISH_ATTEMPTS = 100


@dataclass(frozen=True)
class StoredVersion:
    """One published version; ``meta`` is its hub.json."""

    name: str
    version: str
    path: Path
    meta: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def created_at(self) -> str:
        return self.meta["created_at"]


@dataclass(frozen=True)
class AdapterSummary:
    """A name with its versions, oldest to newest."""

    name: str
    versions: list[StoredVersion]

    @property
    def latest(self) -> StoredVersion:
        return self.versions[-1]


@dataclass(frozen=True)
class LoadedAdapter:
    """A verified version with its tensors in memory (CPU)."""

    name: str
    version: str
    meta: dict
    path: Path
    adapter_tensors: dict[str, torch.Tensor]
    token_rows: torch.Tensor

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a safe single path component, else raise HubError."""
    if not isinstance(value, str) or not value:
        raise HubError(f"adapter {what} must not be empty")
    if len(value) > MAX_NAME_LEN:
        raise HubError(f"adapter {what} {value!r} is longer than {MAX_NAME_LEN} characters")
    if not NAME_RE.fullmatch(value):
        raise HubError(
            f"invalid adapter {what} {value!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``NAME`` or ``NAME@VERSION`` into (name, version or None), validating both."""
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    return name, validate_name(version, "version")


def _describe_backbone(fp: dict) -> str:
    sha = str(fp.get("weights_sha256", "?"))[:8]
    return (
        f"'{fp.get('source', '?')}' ({fp.get('model_type', '?')}, {fp.get('n_layer', '?')} layers, "
        f"d={fp.get('n_embd', '?')}, {fp.get('n_head', '?')} heads, vocab {fp.get('vocab_size', '?')}, "
        f"weights {sha}…)"
    )


def fingerprint_mismatch(needed: dict, loaded: dict) -> str | None:
    """None when the backbones agree on every key but ``source``, else a message naming both."""
    keys = sorted((needed.keys() | loaded.keys()) - {"source"})
    differing = [k for k in keys if needed.get(k) != loaded.get(k)]
    if not differing:
        return None
    return (
        f"needs backbone {_describe_backbone(needed)}, "
        f"but the loaded backbone is {_describe_backbone(loaded)}; differs in {', '.join(differing)}"
    )


def adapter_layers(tensors: dict[str, torch.Tensor], name: str) -> list[dict[str, torch.Tensor]]:
    """Group AdapterHub keys of adapter ``name`` per layer: ln/down/up weights and biases.

    Raises IntegrityError on foreign keys, missing layers or parts, or inconsistent shapes.
    """
    pattern = re.compile(
        rf"transformer\.h\.(\d+)\.output_adapters\.adapters\.{re.escape(name)}\.(.+)"
    )
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key)
        if not match or match.group(2) not in LAYER_PARTS:
            raise IntegrityError(f"unexpected tensor {key!r} in {ADAPTER_WEIGHTS} of adapter '{name}'")
        layers.setdefault(int(match.group(1)), {})[LAYER_PARTS[match.group(2)]] = tensor
    if not layers:
        raise IntegrityError(f"{ADAPTER_WEIGHTS} holds no layers of adapter '{name}'")
    if sorted(layers) != list(range(len(layers))):
        raise IntegrityError(
            f"{ADAPTER_WEIGHTS} of adapter '{name}' has layers {sorted(layers)}, expected 0..n-1"
        )
    result = [layers[i] for i in range(len(layers))]
    for i, layer in enumerate(result):
        missing = sorted(set(LAYER_PARTS.values()) - layer.keys())
        if missing:
            raise IntegrityError(
                f"{ADAPTER_WEIGHTS} of adapter '{name}', layer {i}: missing {', '.join(missing)}"
            )
    d, b = result[0]["ln_weight"].shape[0], result[0]["down_bias"].shape[0]
    expected = {
        "ln_weight": (d,), "ln_bias": (d,), "down_weight": (b, d),
        "down_bias": (b,), "up_weight": (d, b), "up_bias": (d,),
    }
    for i, layer in enumerate(result):
        for part, shape in expected.items():
            if tuple(layer[part].shape) != shape:
                raise IntegrityError(
                    f"{ADAPTER_WEIGHTS} of adapter '{name}', layer {i}: {part} has shape "
                    f"{tuple(layer[part].shape)}, expected {shape}"
                )
    return result


def adapter_kind(meta: dict) -> str:
    """The kind a stored or exported adapter's metadata names (VLM adapters predate the key)."""
    return meta.get("adapter_kind", "vlm")


def payload_files(meta: dict) -> tuple[str, ...]:
    return KIND_PAYLOAD_FILES.get(adapter_kind(meta), PAYLOAD_FILES)


def export_dir(run_dir: Path) -> Path:
    """A run's `best/` export, or `run_dir` itself when it is an export folder."""
    return run_dir / "best" if (run_dir / "best").is_dir() else run_dir


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _version_key(version: str) -> tuple:
    """Integers numerically, then anything else by text: a stable tie-break for equal created_at."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


@dataclass(frozen=True)
class RunExport:
    """A validated run export, read into memory (adapter files are small)."""

    path: Path
    meta: dict
    config: dict
    adapter_tensors: dict[str, torch.Tensor]

    @property
    def trained_name(self) -> str:
        return self.config["name"]


def _read_export_json(path: Path, filename: str) -> dict:
    try:
        data = json.loads((path / filename).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HubError(f"{filename} in run export '{path}' is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise HubError(f"{filename} in run export '{path}' must hold a JSON object")
    return data


def _read_export_tensors(path: Path, filename: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / filename, device="cpu")
    except Exception as e:  # safetensors raises several unrelated types on bad input
        raise HubError(f"{filename} in run export '{path}' is not a readable safetensors file: {e}") from e


def _check_meta(path: Path, meta: dict) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise HubError(f"{ADAPTER_META} in run export '{path}' lacks {', '.join(missing)}")
    tokens = meta["special_tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise HubError(f"{ADAPTER_META} in '{path}': special_tokens must be a non-empty list of strings")
    if meta["eos_token"] not in tokens:
        raise HubError(
            f"{ADAPTER_META} in '{path}': eos_token {meta['eos_token']!r} is not one of special_tokens"
        )
    backbone = meta["backbone"]
    if not isinstance(backbone, dict) or any(k not in backbone for k in FINGERPRINT_KEYS):
        raise HubError(
            f"{ADAPTER_META} in '{path}': backbone must be a fingerprint with {', '.join(FINGERPRINT_KEYS)}"
        )


def _check_shapes(path: Path, meta: dict, layers: list[dict], rows: torch.Tensor) -> None:
    backbone, k = meta["backbone"], len(meta["special_tokens"])
    if rows.ndim != 2 or rows.shape[0] != k:
        raise HubError(
            f"{TASK_TOKENS} in '{path}': rows has shape {tuple(rows.shape)}, "
            f"expected [{k}, d] for {k} special tokens"
        )
    d = layers[0]["ln_weight"].shape[0]
    if rows.shape[1] != d or d != backbone["n_embd"] or len(layers) != backbone["n_layer"]:
        raise HubError(
            f"run export '{path}' is inconsistent: {len(layers)} adapter layers of width {d}, "
            f"token rows of width {rows.shape[1]}, "
            f"backbone with {backbone['n_layer']} layers of width {backbone['n_embd']}"
        )


def _read_vae_export(path: Path) -> RunExport:
    """A sentence-VAE export: metadata and a readable `vae.safetensors` (shapes are checked on loading)."""
    meta = _read_export_json(path, ADAPTER_META)
    missing = [k for k in VAE_REQUIRED_META if k not in meta]
    if missing:
        raise HubError(f"{ADAPTER_META} in run export '{path}' lacks {', '.join(missing)}")
    if not (path / VAE_WEIGHTS).is_file():
        raise HubError(f"run export '{path}' is missing {VAE_WEIGHTS}")
    return RunExport(path, meta, {"name": meta["name"]}, _read_export_tensors(path, VAE_WEIGHTS))


def read_export(path: Path) -> RunExport:
    """Validate a trainer's run export; every problem is a HubError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise HubError(f"run export '{path}' is not a directory")
    if (path / ADAPTER_META).is_file() and adapter_kind(_read_export_json(path, ADAPTER_META)) == VAE_KIND:
        return _read_vae_export(path)
    missing = [f for f in EXPORT_FILES if not (path / f).is_file()]
    if missing:
        raise HubError(
            f"run export '{path}' is missing {', '.join(missing)} (expected {', '.join(EXPORT_FILES)})"
        )
    meta = _read_export_json(path, ADAPTER_META)
    _check_meta(path, meta)
    config = _read_export_json(path, ADAPTER_CONFIG)
    if not isinstance(config.get("name"), str):
        raise HubError(f"{ADAPTER_CONFIG} in run export '{path}' has no adapter name")
    tensors = _read_export_tensors(path, ADAPTER_WEIGHTS)
    token_tensors = _read_export_tensors(path, TASK_TOKENS)
    if "rows" not in token_tensors:
        raise HubError(f"{TASK_TOKENS} in run export '{path}' has no tensor named 'rows'")
    try:
        layers = adapter_layers(tensors, config["name"])
    except IntegrityError as e:
        raise HubError(f"run export '{path}': {e}") from e
    _check_shapes(path, meta, layers, token_tensors["rows"])
    return RunExport(path, meta, config, tensors)


class AdapterStore:
    """Versioned adapters under one root directory; safe for concurrent publishers and readers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- publishing -------------------------------------------------------------------

    def publish(
        self, run_export: str | Path, name: str | None = None, version: str | None = None
    ) -> StoredVersion:
        """Copy a validated run export into the store as ``name@version``, all or nothing.

        Files are staged in ``<root>/.tmp-<uuid>`` and the directory is renamed into place,
        so readers never see a partial version.
        """
        if name is not None:
            validate_name(name)
        if version is not None:
            validate_name(version, "version")
        export = read_export(Path(run_export))
        name = validate_name(name if name is not None else export.meta["name"])
        staging = self.root / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            files = self._stage_payload(export, name, staging)
            return self._commit(staging, export.meta, files, name, version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _stage_payload(self, export: RunExport, name: str, staging: Path) -> dict[str, str]:
        """Write the payload files into ``staging`` (renaming the adapter if needed); return checksums."""
        if adapter_kind(export.meta) != "vlm":
            for filename in payload_files(export.meta):
                shutil.copyfile(export.path / filename, staging / filename)
        elif name == export.trained_name:
            shutil.copyfile(export.path / ADAPTER_CONFIG, staging / ADAPTER_CONFIG)
            shutil.copyfile(export.path / ADAPTER_WEIGHTS, staging / ADAPTER_WEIGHTS)
        else:
            self._write_renamed_adapter(export, name, staging)
        if adapter_kind(export.meta) == "vlm":
            shutil.copyfile(export.path / TASK_TOKENS, staging / TASK_TOKENS)
        files = {}
        for filename in payload_files(export.meta):
            _fsync_file(staging / filename)
            files[filename] = sha256_file(staging / filename)
        return files

    @staticmethod
    def _write_renamed_adapter(export: RunExport, name: str, staging: Path) -> None:
        """Rename the adapter in keys and config so plain ``adapters.load_adapter`` still finds it."""
        old, new = f".adapters.{export.trained_name}.", f".adapters.{name}."
        tensors = {k.replace(old, new): v for k, v in export.adapter_tensors.items()}
        with safe_open(export.path / ADAPTER_WEIGHTS, framework="pt") as f:
            metadata = f.metadata()
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata=metadata)
        _write_json(staging / ADAPTER_CONFIG, {**export.config, "name": name})

    def _commit(
        self, staging: Path, meta: dict, files: dict[str, str], name: str, version: str | None
    ) -> StoredVersion:
        """Rename ``staging`` to ``<name>/<version>``; a lost auto-version race takes the next number."""
        name_dir = self.root / name
        for _ in range(MAX_PUBLISH_ATTEMPTS):
            chosen = version or self._next_version(name)
            target = name_dir / chosen
            if target.exists():
                if version is None:
                    continue
                raise HubError(f"adapter {name}@{chosen} already exists; choose another --version")
            hub = {**meta, "name": name, "version": chosen, "created_at": _utc_now(), "files": files}
            _write_json(staging / HUB_JSON, hub)
            _fsync_file(staging / HUB_JSON)
            _fsync_dir(staging)
            name_dir.mkdir(exist_ok=True)
            try:
                os.rename(staging, target)
            except FileNotFoundError:
                continue  # the name dir was removed concurrently; recreate it
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if version is not None:
                    raise HubError(f"adapter {name}@{chosen} already exists; choose another --version") from e
                continue  # lost an auto-version race: take the next number
            _fsync_dir(name_dir)
            return StoredVersion(name, chosen, target, hub)
        raise HubError(f"could not publish {name}: too many concurrent publishers, try again")

    def _next_version(self, name: str) -> str:
        existing = [int(p.name) for p in self._visible_dirs(self.root / name) if p.name.isdigit()]
        return str(max(existing, default=0) + 1)

    # ---- reading ----------------------------------------------------------------------

    def list(self) -> list[AdapterSummary]:
        """Every name (sorted) with its readable versions, oldest to newest."""
        summaries = []
        for name_dir in sorted(self._visible_dirs(self.root)):
            versions = self._versions(name_dir)
            if versions:
                summaries.append(AdapterSummary(name_dir.name, versions))
        return summaries

    def show(self, ref: str) -> StoredVersion:
        """``NAME`` (newest by created_at) or ``NAME@VERSION``; NotFoundError lists what exists."""
        name, version = parse_ref(ref)
        name_dir = self.root / name
        versions = self._versions(name_dir) if name_dir.is_dir() else []
        if not versions:
            known = ", ".join(s.name for s in self.list()) or "none"
            raise NotFoundError(f"no adapter named '{name}' in store '{self.root}' (available: {known})")
        if version is None:
            return versions[-1]
        if not (name_dir / version).is_dir():
            known = ", ".join(v.version for v in versions)
            raise NotFoundError(f"adapter '{name}' has no version '{version}' (versions: {known})")
        return self._read_version(name_dir / version)

    def snapshot(self) -> dict[str, str]:
        """``name@version -> created_at`` for every version; poll and diff to spot new publishes."""
        return {v.ref: v.created_at for s in self.list() for v in s.versions}

    def load(self, ref: str, backbone: dict | None = None) -> LoadedAdapter:
        """Verify checksums (and the backbone fingerprint, if given) and read the tensors."""
        stored = self.show(ref)
        self._verify(stored)
        if backbone is not None:
            problem = fingerprint_mismatch(stored.meta["backbone"], backbone)
            if problem:
                raise BackboneMismatchError(f"adapter '{stored.ref}' {problem}")
        if adapter_kind(stored.meta) == VAE_KIND:
            tensors = load_file(stored.path / VAE_WEIGHTS, device="cpu")
            no_rows = torch.zeros(0, stored.meta["backbone"]["n_embd"])  # a VAE adds no task tokens
            return LoadedAdapter(stored.name, stored.version, stored.meta, stored.path, tensors, no_rows)
        tensors = load_file(stored.path / ADAPTER_WEIGHTS, device="cpu")
        rows = load_file(stored.path / TASK_TOKENS, device="cpu").get("rows")
        k = len(stored.meta["special_tokens"])
        if rows is None or rows.ndim != 2 or rows.shape[0] != k:
            raise IntegrityError(f"{TASK_TOKENS} of '{stored.ref}' does not hold rows [{k}, d]")
        return LoadedAdapter(stored.name, stored.version, stored.meta, stored.path, tensors, rows)

    def _verify(self, stored: StoredVersion) -> None:
        """Refuse pickle files and any payload file whose sha256 differs from hub.json."""
        for path in stored.path.iterdir():
            if path.suffix in PICKLE_SUFFIXES:
                raise IntegrityError(
                    f"'{stored.ref}' contains {path.name}; refusing pickle files, only safetensors are read"
                )
        recorded = stored.meta.get("files", {})
        for filename in payload_files(stored.meta):
            path = stored.path / filename
            if filename not in recorded or not path.is_file():
                raise IntegrityError(f"{filename} of '{stored.ref}' is missing")
            if sha256_file(path) != recorded[filename]:
                raise IntegrityError(
                    f"{filename} of '{stored.ref}' is corrupted or modified (sha256 mismatch)"
                )

    # ---- changing ---------------------------------------------------------------------

    def remove(self, ref: str) -> list[str]:
        """Remove ``NAME`` (all versions) or ``NAME@VERSION``; return the removed refs."""
        name, version = parse_ref(ref)
        name_dir = self.root / name
        if not name_dir.is_dir():
            raise NotFoundError(f"no adapter named '{name}' in store '{self.root}'")
        if version is None:
            target = name_dir
            removed = [f"{name}@{p.name}" for p in self._visible_dirs(name_dir)]
        else:
            target = name_dir / version
            if not target.is_dir():
                known = ", ".join(p.name for p in self._visible_dirs(name_dir)) or "none"
                raise NotFoundError(f"adapter '{name}' has no version '{version}' (versions: {known})")
            removed = [f"{name}@{version}"]
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(target, trash)
        except FileNotFoundError as e:
            raise NotFoundError(f"'{ref}' was removed concurrently") from e
        shutil.rmtree(trash)
        if version is not None:
            self._remove_if_empty(name_dir)
        return sorted(removed)

    @staticmethod
    def _remove_if_empty(path: Path) -> None:
        try:
            path.rmdir()
        except OSError:
            pass  # not empty (or already gone): nothing to do

    def update_metrics(self, ref: str, metrics: dict) -> StoredVersion:
        """Merge ``metrics`` into the version's hub.json (not checksummed) by atomic replace."""
        stored = self.show(ref)
        meta = {**stored.meta, "metrics": {**stored.meta.get("metrics", {}), **metrics}}
        tmp = stored.path / f".{HUB_JSON}.tmp-{uuid.uuid4().hex}"
        try:
            _write_json(tmp, meta)
            _fsync_file(tmp)
            os.replace(tmp, stored.path / HUB_JSON)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredVersion(stored.name, stored.version, stored.path, meta)

    # ---- scanning ---------------------------------------------------------------------

    @staticmethod
    def _visible_dirs(path: Path) -> list[Path]:
        """Subdirectories that are not internal (``.tmp-*``, ``.trash-*``, other hidden)."""
        try:
            return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except FileNotFoundError:
            return []

    def _versions(self, name_dir: Path) -> list[StoredVersion]:
        versions = []
        for version_dir in self._visible_dirs(name_dir):
            try:
                versions.append(self._read_version(version_dir))
            except IntegrityError:
                continue  # unreadable hub.json: not a usable version
        return sorted(versions, key=lambda v: (v.created_at, _version_key(v.version)))

    @staticmethod
    def _read_version(version_dir: Path) -> StoredVersion:
        try:
            meta = json.loads((version_dir / HUB_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{HUB_JSON} in '{version_dir}' is unreadable: {e}") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("created_at"), str):
            raise IntegrityError(f"{HUB_JSON} in '{version_dir}' is not a version record")
        return StoredVersion(version_dir.parent.name, version_dir.name, version_dir, meta)
