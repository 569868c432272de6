"""What every `hub` command shares: the common options, opening the store, torch threads, JSON output, and turning
a command's options into a library settings object (each default is the library's own)."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from hub.model.dtypes import BACKBONE_DTYPES, DTYPE_NAMES
from hub.serving.fairness import ADMISSION
from hub.store.refs import SEPARATOR

if TYPE_CHECKING:
    from hub.store.protocol import Store  # torch: imported by the commands that open a store

T = TypeVar("T")

DEFAULT_STORE = os.environ.get("HUB_STORE", "adapters_store")
StoreOption = typer.Option(DEFAULT_STORE, "--store", help="adapter store: a folder, or an fsspec URL such as "
                           "s3://bucket/prefix (env HUB_STORE)")
DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda")
BaseOption = typer.Option(None, "--base", help="GPT-2 HF id or local folder (env HUB_BASE)")
TrainBaseOption = typer.Option("gpt2", "--base", envvar="HUB_BASE", show_default=True,
                               help="GPT-2 to train on: a local folder (offline: ../shared/models/gpt2-standin) "
                                    "or a Hugging Face id, downloaded when online (env HUB_BASE)")
ThreadsOption = typer.Option(None, "--threads", min=1,
                             help="torch threads (default: OMP_NUM_THREADS if set, else the physical cores)")

# The backbone's dtype when serving (adapters always compute in float32), and what resident VLM adapter weights are
# stored in (their arithmetic stays float32): choices from `hub.model.dtypes`.
DType = Enum("DType", {name: name for name in BACKBONE_DTYPES}, type=str)  # type: ignore[misc]
BankDType = Enum("BankDType", {name: name for name in DTYPE_NAMES}, type=str)  # type: ignore[misc]
Admission = Enum("Admission", {name: name for name in ADMISSION}, type=str)  # type: ignore[misc]
DTypeOption = typer.Option(BACKBONE_DTYPES[0], "--dtype", help="backbone dtype: auto = float32 on CPU, bfloat16 on GPU")


def open_store(location: str) -> Store:
    from hub.store.backends import open_store as open_location

    return open_location(location)


def set_threads(threads: int | None, processes: int = 1) -> str:
    """Set torch's intra-op threads: --threads, else OMP_NUM_THREADS, else the physical cores shared by the
    `processes` of this run (two trainings side by side with a thread per logical core each run several times
    slower). Returns what was chosen."""
    import psutil
    import torch

    if threads:
        why = "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        shared = f" / {processes} processes" if processes > 1 else ""
        threads, why = max(1, cores // processes), "physical cores" + shared
    torch.set_num_threads(threads)
    return f"{threads} torch threads ({why})"


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def settings(cls: type[T], **options: Any) -> T:
    """`cls(...)` from a command's options: those given (not None; enums by value) override, the others keep the
    dataclass's defaults, so a default is written once, in the library."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    given = {k: v.value if isinstance(v, Enum) else v for k, v in options.items() if v is not None}
    unknown = given.keys() - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    return cls(**given)


def eval_out_dir(label: str, split: str) -> Path:
    """`runs/eval-LABEL-SPLIT` (a ref's `@` spelled `-`)."""
    return Path("runs") / f"eval-{label.replace(SEPARATOR, '-')}-{split}"
