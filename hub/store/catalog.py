"""The adapter store: versioned, checksummed, atomically published task adapters.

Layout: ``<root>/<name>/<version>/`` holds ``adapter_config.json``, ``adapter.safetensors``
(AdapterHub format, loadable by plain ``adapters``), ``task_tokens.safetensors`` (tensor
``rows`` [k, d]) and ``hub.json`` (the trainer's metadata plus ``name``, ``version``,
``created_at`` and the sha256 of every payload file). A sentence-VAE version (``adapter_kind: sentence_vae``,
`hub.adapters.vae`) holds ``vae.safetensors`` and ``hub.json`` instead (`KIND_PAYLOAD_FILES`). Directories starting
with ``.``
(``.tmp-*`` staging, ``.trash-*`` removal) are internal and never listed; `gc` removes stale ones.

Every version is validated fully (hub.json's schema, payload files, checksums, no pickle files, no symbolic
links) before it is listed as usable; a bad one is *skipped* with its reason, and the newest good version of a
name is the one served. Validation results are cached per version folder until any of its files changes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hub.errors import BackboneMismatchError, HubError, IntegrityError, NotFoundError
from hub.store.format import SENTENCE_VAE, VLM, AdapterMeta
from hub.store.verified import VERIFIED

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
TASK_TOKENS = "task_tokens.safetensors"
ADAPTER_META = "adapter_meta.json"
HUB_JSON = "hub.json"
TRAIN_LOG = "train_log.json"  # optional: the run's losses, stored when the export has it (`hub show --plot`)
EXPORT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TOKENS, ADAPTER_META)
# adapter_meta.json is not stored: hub.json carries its content.
PAYLOAD_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TOKENS)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

VAE_WEIGHTS = "vae.safetensors"
# adapter kind -> the files its bundle stores (and hub.json checksums); kinds not named here store a VLM bundle
KIND_PAYLOAD_FILES = {VLM: PAYLOAD_FILES, SENTENCE_VAE: (VAE_WEIGHTS,)}
KIND_WEIGHTS = {SENTENCE_VAE: VAE_WEIGHTS}  # adapter kind -> the file LoadedAdapter.adapter_tensors come from

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
STALE_AFTER_S = 3600.0  # internal folders older than this belong to no live publisher
INTERNAL_PREFIXES = (".tmp-", ".trash-", f".{HUB_JSON}.tmp-")


@dataclass(frozen=True)
class StoredVersion:
    """One published, fully validated version; ``meta`` is its hub.json."""

    name: str
    version: str
    path: Path
    meta: AdapterMeta

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def created_at(self) -> str:
        return self.meta.created_at


@dataclass(frozen=True)
class SkippedVersion:
    """A version folder (or a whole name, `version` None) that is not used, and why."""

    name: str
    version: str | None
    reason: str

    @property
    def ref(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class AdapterSummary:
    """A name with its usable versions, oldest to newest, and the versions skipped."""

    name: str
    versions: list[StoredVersion]
    skipped: list[SkippedVersion] = field(default_factory=list)

    @property
    def latest(self) -> StoredVersion:
        return self.versions[-1]


@dataclass(frozen=True)
class LoadedAdapter:
    """A verified version with its tensors in memory (CPU)."""

    name: str
    version: str
    meta: AdapterMeta
    path: Path | None
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


def payload_files(meta: AdapterMeta) -> tuple[str, ...]:
    """The files a version of `meta`'s kind stores besides hub.json, each checksummed in `meta.files`."""
    return KIND_PAYLOAD_FILES.get(meta.adapter_kind, PAYLOAD_FILES)


def weights_file(meta: AdapterMeta) -> str:
    return KIND_WEIGHTS.get(meta.adapter_kind, ADAPTER_WEIGHTS)


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


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def version_key(version: str) -> tuple:
    """Integers numerically, then anything else by text: a stable tie-break for equal created_at."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


@dataclass(frozen=True)
class RunExport:
    """A validated run export, read into memory (adapter files are small)."""

    path: Path
    meta: AdapterMeta
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


def _check_shapes(path: Path, meta: AdapterMeta, layers: list[dict], rows: torch.Tensor) -> None:
    backbone, k = meta.backbone, len(meta.special_tokens)
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


def _read_vae_export(path: Path, meta: AdapterMeta) -> RunExport:
    """A sentence-VAE export: its metadata and a readable `vae.safetensors` (shapes are checked on loading)."""
    if not (path / VAE_WEIGHTS).is_file():
        raise HubError(f"run export '{path}' is missing {VAE_WEIGHTS}")
    return RunExport(path, meta, {"name": meta.name}, _read_export_tensors(path, VAE_WEIGHTS))


def read_export(path: Path) -> RunExport:
    """Validate a trainer's run export; every problem is a HubError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise HubError(f"run export '{path}' is not a directory")
    if (path / ADAPTER_META).is_file():
        meta = AdapterMeta.from_dict(_read_export_json(path, ADAPTER_META), f"{ADAPTER_META} in run export '{path}'")
        if meta.adapter_kind == SENTENCE_VAE:
            return _read_vae_export(path, meta)
    missing = [f for f in EXPORT_FILES if not (path / f).is_file()]
    if missing:
        raise HubError(
            f"run export '{path}' is missing {', '.join(missing)} (expected {', '.join(EXPORT_FILES)})"
        )
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


def check_backbone(stored: StoredVersion, backbone: dict) -> None:
    """BackboneMismatchError unless the version was trained on the backbone with this fingerprint."""
    problem = fingerprint_mismatch(dict(stored.meta.backbone), backbone)
    if problem:
        raise BackboneMismatchError(f"adapter '{stored.ref}' {problem}")


def loaded_adapter(stored: StoredVersion, backbone: dict | None,
                   read_tensors: Callable[[str], dict[str, torch.Tensor]]) -> LoadedAdapter:
    """A verified version's tensors (`read_tensors(payload file name)`) as a LoadedAdapter, after checking the
    backbone fingerprint (if given) and the task rows' shape; every store backend ends its `load` here."""
    if backbone is not None:
        check_backbone(stored, backbone)
    adapter_tensors = read_tensors(weights_file(stored.meta))
    if not stored.meta.has_task_tokens:
        no_rows = torch.zeros(0, stored.meta.backbone["n_embd"])
        return LoadedAdapter(stored.name, stored.version, stored.meta, stored.path, adapter_tensors, no_rows)
    rows = read_tensors(TASK_TOKENS).get("rows")
    k = len(stored.meta.special_tokens)
    d = stored.meta.backbone.get("n_embd")
    if rows is None or rows.ndim != 2 or rows.shape[0] != k or (d is not None and rows.shape[1] != d):
        raise IntegrityError(f"{TASK_TOKENS} of '{stored.ref}' does not hold rows [{k}, {d or 'd'}] for its "
                             f"backbone" + (f" (found {list(rows.shape)})" if rows is not None else ""))
    return LoadedAdapter(stored.name, stored.version, stored.meta, stored.path, adapter_tensors, rows)


def read_training_log(stored: StoredVersion, read: Callable[[], bytes]) -> dict:
    """A version's `train_log.json` from `read()` (a file, an object); NotFoundError when it has none."""
    try:
        return json.loads(read())
    except FileNotFoundError:
        raise NotFoundError(f"'{stored.ref}' has no training log (published from an export without "
                            f"{TRAIN_LOG}); its run folder's loss_curve.png has the curve") from None
    except ValueError as e:
        raise IntegrityError(f"{TRAIN_LOG} of '{stored.ref}' is not readable JSON: {e}") from e


def stage_payload(export: RunExport, name: str, staging: Path) -> dict[str, str]:
    """Write the payload files into ``staging`` (renaming a VLM adapter if needed); return checksums."""
    payload = payload_files(export.meta)
    if payload != PAYLOAD_FILES:
        for filename in payload:
            shutil.copyfile(export.path / filename, staging / filename)
    elif name == export.trained_name:
        for filename in PAYLOAD_FILES:
            shutil.copyfile(export.path / filename, staging / filename)
    else:
        _write_renamed_adapter(export, name, staging)
        shutil.copyfile(export.path / TASK_TOKENS, staging / TASK_TOKENS)
    if (export.path / TRAIN_LOG).is_file():
        shutil.copyfile(export.path / TRAIN_LOG, staging / TRAIN_LOG)
    files = {}
    for filename in payload:
        _fsync_file(staging / filename)
        files[filename] = sha256_file(staging / filename)
    return files


def _write_renamed_adapter(export: RunExport, name: str, staging: Path) -> None:
    """Rename the adapter in keys and config so plain ``adapters.load_adapter`` still finds it."""
    old, new = f".adapters.{export.trained_name}.", f".adapters.{name}."
    tensors = {k.replace(old, new): v for k, v in export.adapter_tensors.items()}
    with safe_open(export.path / ADAPTER_WEIGHTS, framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, staging / ADAPTER_WEIGHTS, metadata=metadata)
    _write_json(staging / ADAPTER_CONFIG, {**export.config, "name": name})


class AdapterStore:
    """Versioned adapters under one root directory; safe for concurrent publishers and readers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._checked: dict[Path, tuple[tuple, StoredVersion | str]] = {}  # folder -> (signature, result)

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
        name = validate_name(name if name is not None else export.meta.name)
        staging = self.root / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            files = stage_payload(export, name, staging)
            return self._commit(staging, export.meta, files, name, version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _commit(
        self, staging: Path, meta: AdapterMeta, files: dict[str, str], name: str, version: str | None
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
            hub = meta.stored_as(name, chosen, utc_now(), files)
            _write_json(staging / HUB_JSON, hub.to_dict())
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
        """Every name (sorted) with its usable versions, oldest to newest, and the skipped ones with why."""
        summaries = (self._summary(name_dir) for name_dir in sorted(self._visible_dirs(self.root)))
        return [summary for summary in summaries if summary is not None]

    def _summary(self, name_dir: Path) -> AdapterSummary | None:
        """One name's versions (None: no folder or nothing in it)."""
        if name_dir.is_symlink():
            reason = f"'{name_dir}' is a symbolic link; the store refuses links"
            return AdapterSummary(name_dir.name, [], [SkippedVersion(name_dir.name, None, reason)])
        versions, skipped = self._versions(name_dir)
        return AdapterSummary(name_dir.name, versions, skipped) if versions or skipped else None

    def show(self, ref: str) -> StoredVersion:
        """``NAME`` (newest usable by created_at) or ``NAME@VERSION``; NotFoundError lists what exists,
        IntegrityError says why a version is skipped. Reads only that name's folder."""
        name, version = parse_ref(ref)
        summary = self._summary(self.root / name)
        if summary is None:
            known = ", ".join(s.name for s in self.list() if s.versions) or "none"
            raise NotFoundError(f"no adapter named '{name}' in store '{self.root}' (available: {known})")
        if version is None:
            if summary.versions:
                return summary.versions[-1]
            reasons = "; ".join(f"{s.ref}: {s.reason}" for s in summary.skipped)
            raise IntegrityError(f"adapter '{name}' has no usable version ({reasons})")
        for stored in summary.versions:
            if stored.version == version:
                return stored
        for skipped in summary.skipped:
            if skipped.version in (version, None):
                raise IntegrityError(f"'{name}@{version}' is skipped: {skipped.reason}")
        known = ", ".join(v.version for v in summary.versions) or "none"
        raise NotFoundError(f"adapter '{name}' has no version '{version}' (versions: {known})")

    def snapshot(self) -> dict[str, str]:
        """``name@version -> created_at`` (or why it is skipped); poll and diff to spot changes."""
        listing = self.list()
        return {
            **{v.ref: v.created_at for s in listing for v in s.versions},
            **{k.ref: f"skipped: {k.reason}" for s in listing for k in s.skipped},
        }

    def load(self, ref: str, backbone: dict | None = None) -> LoadedAdapter:
        """Verify checksums again (and the backbone fingerprint, if given) and read the tensors."""
        stored = self.show(ref)
        self._verify(stored.path, stored.ref, stored.meta)
        return loaded_adapter(stored, backbone, lambda filename: load_file(stored.path / filename, device="cpu"))

    @staticmethod
    def _verify(path: Path, ref: str, meta: AdapterMeta) -> None:
        """Refuse links, pickle files and any payload file missing or whose sha256 differs from hub.json."""
        for entry in path.iterdir():
            if entry.is_symlink():
                raise IntegrityError(f"'{ref}' contains the symbolic link {entry.name}; the store refuses links")
            if entry.suffix in PICKLE_SUFFIXES:
                raise IntegrityError(f"'{ref}' contains {entry.name}; refusing pickle files, only safetensors are read")
        for filename in payload_files(meta):
            file = path / filename
            if filename not in meta.files or not stat.S_ISREG(_lstat_mode(file)):
                raise IntegrityError(f"{filename} of '{ref}' is missing")
            if VERIFIED.sha256(file) != meta.files[filename]:  # hashed again only if the file changed
                raise IntegrityError(f"{filename} of '{ref}' is corrupted or modified (sha256 mismatch)")

    def training_log(self, ref: str) -> tuple[StoredVersion, dict]:
        """The version and its stored `train_log.json`; NotFoundError when it was published without one."""
        stored = self.show(ref)
        return stored, read_training_log(stored, (stored.path / TRAIN_LOG).read_bytes)

    # ---- changing ---------------------------------------------------------------------

    def remove(self, ref: str) -> list[str]:
        """Remove ``NAME`` (all versions) or ``NAME@VERSION``; return the removed refs."""
        name, version = parse_ref(ref)
        name_dir = self.root / name
        target = name_dir if version is None else name_dir / version
        if target.is_symlink() or name_dir.is_symlink():
            raise HubError(f"'{target}' is a symbolic link; the store refuses links (remove it yourself if intended)")
        if not name_dir.is_dir():
            raise NotFoundError(f"no adapter named '{name}' in store '{self.root}'")
        if version is None:
            removed = [f"{name}@{p.name}" for p in self._visible_dirs(name_dir)]
        else:
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
        meta = stored.meta.with_metrics(metrics)
        tmp = stored.path / f".{HUB_JSON}.tmp-{uuid.uuid4().hex}"
        try:
            _write_json(tmp, meta.to_dict())
            _fsync_file(tmp)
            os.replace(tmp, stored.path / HUB_JSON)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredVersion(stored.name, stored.version, stored.path, meta)

    def gc(self, older_than_s: float = STALE_AFTER_S) -> list[Path]:
        """Remove internal leftovers of killed publishes, removals and metric updates older than `older_than_s`
        (a live publisher's staging folder is younger); return what was removed."""
        cutoff = time.time() - older_than_s
        candidates = [p for p in self.root.iterdir() if p.name.startswith(INTERNAL_PREFIXES)]
        for name_dir in self._visible_dirs(self.root):
            if not name_dir.is_symlink():
                for version_dir in self._visible_dirs(name_dir):
                    candidates += [p for p in version_dir.iterdir() if p.name.startswith(INTERNAL_PREFIXES)]
        removed = []
        for path in candidates:
            try:
                if path.lstat().st_mtime > cutoff:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue  # removed concurrently
            removed.append(path)
        return removed

    # ---- scanning ---------------------------------------------------------------------

    @staticmethod
    def _visible_dirs(path: Path) -> list[Path]:
        """Subdirectories (or links to them) that are not internal (``.tmp-*``, ``.trash-*``, other hidden)."""
        try:
            return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _versions(self, name_dir: Path) -> tuple[list[StoredVersion], list[SkippedVersion]]:
        versions, skipped = [], []
        for version_dir in self._visible_dirs(name_dir):
            result = self._checked_version(version_dir)
            if isinstance(result, StoredVersion):
                versions.append(result)
            else:
                skipped.append(SkippedVersion(name_dir.name, version_dir.name, result))
        versions.sort(key=lambda v: (v.created_at, version_key(v.version)))
        return versions, sorted(skipped, key=lambda k: version_key(k.version))

    def _checked_version(self, version_dir: Path) -> StoredVersion | str:
        """The validated version, or why it is skipped; cached until a file of the folder changes."""
        signature = _folder_signature(version_dir)
        cached = self._checked.get(version_dir)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            result: StoredVersion | str = self._read_version(version_dir)
        except IntegrityError as err:
            result = str(err)
        self._checked[version_dir] = (signature, result)
        return result

    def _read_version(self, version_dir: Path) -> StoredVersion:
        ref = f"{version_dir.parent.name}@{version_dir.name}"
        if version_dir.is_symlink():
            raise IntegrityError(f"'{ref}' is a symbolic link; the store refuses links")
        hub_json = version_dir / HUB_JSON
        if not stat.S_ISREG(_lstat_mode(hub_json)):
            raise IntegrityError(f"{HUB_JSON} of '{ref}' is missing or not a regular file")
        try:
            data = json.loads(hub_json.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise IntegrityError(f"{HUB_JSON} of '{ref}' is unreadable: {e}") from e
        meta = AdapterMeta.from_dict(data, f"{HUB_JSON} of '{ref}'", stored=True)
        self._verify(version_dir, ref, meta)
        return StoredVersion(version_dir.parent.name, version_dir.name, version_dir, meta)


def _lstat_mode(path: Path) -> int:
    """The file type bits without following links (0 when missing)."""
    try:
        return path.lstat().st_mode
    except OSError:
        return 0


def _folder_signature(path: Path) -> tuple:
    """Name, type, size, mtime and inode of every entry: changes whenever a file is replaced or edited."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        return tuple((e.name, *_entry_stat(e)) for e in entries)
    except OSError:
        return ()


def _entry_stat(entry: os.DirEntry) -> tuple:
    info = entry.stat(follow_symlinks=False)
    return info.st_mode, info.st_size, info.st_mtime_ns, info.st_ino
