"""Run exports: the folder a trainer writes (`best/`) and `hub publish` reads — the one reader and writer.

A VLM export holds ``adapter_config.json``, ``adapter.safetensors`` (AdapterHub format), ``task_tokens.safetensors``
(tensor ``rows`` [k, d]) and ``adapter_meta.json`` (an `AdapterMeta`); a kind without task tokens (a sentence VAE)
holds its weights file and ``adapter_meta.json``. An optional ``train_log.json`` is published with the version.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hub.errors import HubError, IntegrityError
from hub.store.fileio import fsync_file, sha256_file, write_json
from hub.store.format import AdapterMeta
from hub.store.layout import (
    ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS, EXPORT_FILES, PAYLOAD_FILES, TASK_TOKENS, TRAIN_LOG, payload_files,
    weights_file,
)
from hub.store.kinds import weights_format


def export_dir(run_dir: Path) -> Path:
    """A run's `best/` export, or `run_dir` itself when it is an export folder."""
    return run_dir / "best" if (run_dir / "best").is_dir() else run_dir


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


# ---- writing ------------------------------------------------------------------------------------------------

@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """Write into `<out_dir>.tmp`, then replace `out_dir` by a rename: a crash never leaves half an export."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def write_export(out_dir: Path, meta: AdapterMeta | Mapping[str, Any],
                 write_payload: Callable[[Path], None]) -> AdapterMeta:
    """Replace `out_dir` atomically by an export: `write_payload(folder)` writes the kind's payload files, and
    `meta` (validated through `AdapterMeta` first, so a bad export is never written) becomes adapter_meta.json."""
    checked = meta if isinstance(meta, AdapterMeta) else AdapterMeta.from_dict(
        dict(meta), f"the {ADAPTER_META} of '{out_dir}'")
    with staging(out_dir) as tmp:
        write_payload(tmp)
        (tmp / ADAPTER_META).write_text(json.dumps(checked.to_dict(), indent=2))
    return checked


# ---- reading ------------------------------------------------------------------------------------------------

def _read_json(path: Path, filename: str) -> dict:
    try:
        data = json.loads((path / filename).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HubError(f"{filename} in run export '{path}' is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise HubError(f"{filename} in run export '{path}' must hold a JSON object")
    return data


def _read_tensors(path: Path, filename: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / filename, device="cpu")
    except Exception as e:  # safetensors raises several unrelated types on bad input
        raise HubError(f"{filename} in run export '{path}' is not a readable safetensors file: {e}") from e


def _check_shapes(path: Path, meta: AdapterMeta, layers: int, width: int, rows: torch.Tensor) -> None:
    backbone, k = meta.backbone, len(meta.special_tokens)
    if rows.ndim != 2 or rows.shape[0] != k:
        raise HubError(
            f"{TASK_TOKENS} in '{path}': rows has shape {tuple(rows.shape)}, "
            f"expected [{k}, d] for {k} special tokens"
        )
    if rows.shape[1] != width or width != backbone["n_embd"] or layers != backbone["n_layer"]:
        raise HubError(
            f"run export '{path}' is inconsistent: {layers} adapter layers of width {width}, "
            f"token rows of width {rows.shape[1]}, "
            f"backbone with {backbone['n_layer']} layers of width {backbone['n_embd']}"
        )


def _read_bundle_export(path: Path, meta: AdapterMeta) -> RunExport:
    """An export of a kind without task tokens: its metadata and a readable weights file (shapes are checked on
    loading)."""
    weights = weights_file(meta)
    if not (path / weights).is_file():
        raise HubError(f"run export '{path}' is missing {weights}")
    return RunExport(path, meta, {"name": meta.name}, _read_tensors(path, weights))


def read_export(path: Path) -> RunExport:
    """Validate a trainer's run export; every problem is a HubError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise HubError(f"run export '{path}' is not a directory")
    if (path / ADAPTER_META).is_file():
        meta = AdapterMeta.from_dict(_read_json(path, ADAPTER_META), f"{ADAPTER_META} in run export '{path}'")
        if not meta.has_task_tokens:
            return _read_bundle_export(path, meta)
    missing = [f for f in EXPORT_FILES if not (path / f).is_file()]
    if missing:
        raise HubError(f"run export '{path}' is missing {', '.join(missing)} (expected {', '.join(EXPORT_FILES)})")
    config = _read_json(path, ADAPTER_CONFIG)
    if not isinstance(config.get("name"), str):
        raise HubError(f"{ADAPTER_CONFIG} in run export '{path}' has no adapter name")
    tensors = _read_tensors(path, ADAPTER_WEIGHTS)
    token_tensors = _read_tensors(path, TASK_TOKENS)
    if "rows" not in token_tensors:
        raise HubError(f"{TASK_TOKENS} in run export '{path}' has no tensor named 'rows'")
    try:
        layers, width = weights_format(meta.adapter_kind).shape(tensors, config["name"])
    except IntegrityError as e:
        raise HubError(f"run export '{path}': {e}") from e
    _check_shapes(path, meta, layers, width, token_tensors["rows"])
    return RunExport(path, meta, config, tensors)


# ---- publishing ---------------------------------------------------------------------------------------------

def stage_payload(export: RunExport, name: str, folder: Path) -> dict[str, str]:
    """Write the payload files into `folder` (renaming a VLM adapter to `name` if needed); return checksums."""
    payload = payload_files(export.meta)
    if payload == PAYLOAD_FILES and name != export.trained_name:
        _write_renamed_adapter(export, name, folder)
        shutil.copyfile(export.path / TASK_TOKENS, folder / TASK_TOKENS)
    else:
        for filename in payload:
            shutil.copyfile(export.path / filename, folder / filename)
    if (export.path / TRAIN_LOG).is_file():  # checksummed like the payload (`layout.checked_files`)
        shutil.copyfile(export.path / TRAIN_LOG, folder / TRAIN_LOG)
        payload = (*payload, TRAIN_LOG)
    files = {}
    for filename in payload:
        fsync_file(folder / filename)
        files[filename] = sha256_file(folder / filename)
    return files


def _write_renamed_adapter(export: RunExport, name: str, folder: Path) -> None:
    """Rename the adapter in keys and config so plain ``adapters.load_adapter`` still finds it."""
    tensors = weights_format(export.meta.adapter_kind).rename(export.adapter_tensors, export.trained_name, name)
    with safe_open(export.path / ADAPTER_WEIGHTS, framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata=metadata)
    write_json(folder / ADAPTER_CONFIG, {**export.config, "name": name})
