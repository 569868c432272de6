"""`hub train` (a task adapter, a baseline, or a sentence VAE) and `hub tasks` (the task types it knows)."""

from __future__ import annotations

import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from cli.common import DeviceOption, ThreadsOption, TrainBaseOption, set_threads
from hub.adapters.registry import find_kind, kind_specs
from hub.adapters.spec import load_hook
from hub.errors import HubError


class Method(str, Enum):
    """What `hub train` trains: the VLM adapter, or a baseline of `hub.training.baselines` to compare it with."""

    adapter = "adapter"
    full = "full"
    lora = "lora"


def train(
    ctx: typer.Context,
    task_type: str = typer.Argument(..., help="task type: e2e, text2text, ..."),
    data: str = typer.Option(..., "--data", help="HF dataset id, or a local file or folder"),
    name: Optional[str] = typer.Option(None, "--name", help="store name of the adapter (default: the task type)"),
    base: str = TrainBaseOption,
    bottleneck: Optional[int] = typer.Option(None, help="adapter bottleneck (default: the task's VLM value)"),
    epochs: Optional[int] = typer.Option(None, help="epochs (default: the task's)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="optimizer steps; overrides --epochs"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: the task's)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="tokens per example (prompt + target)"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="evaluate every N steps (default: epoch)"),
    seed: int = typer.Option(0),
    threads: Optional[int] = ThreadsOption,
    device: str = DeviceOption,
    out: Path = typer.Option(Path("runs/latest"), "--out", help="run directory (re-run to resume)"),
    input_field: Optional[str] = typer.Option(None, "--input-field", help="text2text: input field name"),
    target_field: Optional[str] = typer.Option(None, "--target-field", help="text2text: target field name"),
    source_lang: Optional[str] = typer.Option(None, "--source-lang", help="translate: source language code"),
    target_lang: Optional[str] = typer.Option(None, "--target-lang", help="translate: target language code"),
    method: Method = typer.Option(Method.adapter, "--method", help="adapter: the VLM adapter; full: full "
                                  "fine-tuning baseline; lora: LoRA baseline, size matched to the adapter's"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="data-parallel processes on this machine (torchrun; one "
                              "GPU each, else gloo on the CPU); --batch-size is per process"),
    train_examples: Optional[int] = typer.Option(None, "--train-examples", help="train on N examples only, taken "
                                                 "input by input (all references of an input together)"),
    data_seed: int = typer.Option(0, "--data-seed", help="which N examples (with --train-examples)"),
    mvcr: bool = typer.Option(False, "--mvcr", help="MVCR: random multi-view autoencoders in the frozen model "
                              "while training (docs/MVCR.md); removed afterwards, nothing extra is exported"),
    mvcr_layers: Optional[str] = typer.Option(None, "--mvcr-layers", help="block indices, e.g. 6,8,11 "
                                              "(default: blocks 6, 8, 11 of 12 at the same relative depths)"),
    mvcr_dims: Optional[str] = typer.Option(None, "--mvcr-dims", help="autoencoder sizes, e.g. 128,256,512 "
                                            "(default: those × hidden size / 768)"),
    mvcr_noise: Optional[float] = typer.Option(None, "--mvcr-noise", help="std of the noise (default 0.002)"),
    mvcr_pretrain_epochs: Optional[int] = typer.Option(None, "--mvcr-pretrain-epochs",
                                                       help="autoencoder warm-up epochs (default 4)"),
    mvcr_ae_lr: Optional[float] = typer.Option(None, "--mvcr-ae-lr", help="reconstruction lr (default 1e-3)"),
) -> None:
    """Train a task adapter on the frozen backbone (or, with --method full|lora, a baseline to compare with).

    An adapter kind trained on its own (`sentence_vae`) takes its own options: hub vae train-options --help.
    Data-parallel with `hub train --nproc N ...` or `accelerate launch --num_processes N -m hub train ...`."""
    kind = find_kind(task_type)
    if kind is not None and kind.cli_train:  # the kind's trainer, given every option of this command
        return load_hook(kind.cli_train)(ctx.args, ctx.params)
    if ctx.args:
        raise HubError(f"unknown option(s) {' '.join(ctx.args)} for task type {task_type!r}")
    _join_data_parallel(nproc, device)
    task_options = {"input_field": input_field, "target_field": target_field, "source_lang": source_lang,
                    "target_lang": target_lang}
    recipe = {"bottleneck": bottleneck, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum,
              "max_length": max_length, "epochs": epochs}
    mvcr_spec = _mvcr_spec(mvcr, mvcr_layers, mvcr_dims, mvcr_noise, mvcr_pretrain_epochs, mvcr_ae_lr)
    task, config = _train_config(task_type, task_options, recipe, name=name, data=data, max_steps=max_steps,
                                 eval_every=eval_every, seed=seed, base=base, method=method.value,
                                 train_examples=train_examples, data_seed=data_seed, regularizers=mvcr_spec)
    _run_training(task, config, device, threads, out)


def _join_data_parallel(nproc: int, device: str) -> None:
    """With --nproc N and no launcher, re-run this command under one (and exit with its status); else join the
    process group the launcher made (a single process joins none)."""
    from hub.training import distributed

    if nproc > 1 and distributed.launched_world_size() == 1:
        raise typer.Exit(subprocess.call(distributed.relaunch_command(nproc, sys.argv[1:])))
    if note := distributed.single_process_accelerate_note():
        typer.echo(note, err=True)
    distributed.join(device)


def _train_config(task_type: str, task_options: dict[str, str | None], recipe: dict[str, Any], *, name: str | None,
                  **options: Any):
    """The task and `hub train`'s `TrainConfig`: the task's VLM recipe where an option is not given."""
    from hub.store.refs import validate_name
    from hub.training.baselines import default_lr
    from hub.training.trainer import TrainConfig
    from tasks import make_task

    task = make_task(task_type, {k: v for k, v in task_options.items() if v})
    defaults = {f: getattr(task.defaults, f) for f in ("bottleneck", "batch_size", "grad_accum", "max_length",
                                                       "epochs")}
    defaults["lr"] = default_lr(task, options["method"])
    chosen = {k: v or defaults[k] for k, v in recipe.items()}
    config = TrainConfig(name=validate_name(name or task_type), task_type=task_type, task_config=task.config(),
                         **chosen, **options)
    return task, config


def _run_training(task, config, device: str, threads: int | None, out: Path) -> None:
    """Read the data, load the backbone, train (every process), and tell the user what to do next (rank 0)."""
    import torch

    from hub.model.backbone import load_backbone
    from hub.training import distributed
    from hub.training.baselines import describe_trainable, make_trainer
    from hub.training.run_dir import RunDir
    from hub.training.subset import check_subset_size

    training, held_out = task.load_examples(config.data, "train"), task.load_examples(config.data, "validation")
    backbone = load_backbone(config.base, device, dtype=torch.float32)
    config.max_length = min(config.max_length, backbone.n_positions)
    if config.train_examples is not None:
        check_subset_size(config.train_examples, len(training))
    process = distributed.join(backbone.device)
    threads_used = set_threads(threads, process.world_size)
    trainer = make_trainer(backbone, task, config, out)  # first: it checks and completes the MVCR settings
    process.on_main(lambda: RunDir(out).prepare(config))
    if process.is_main:
        typer.echo(f"{len(training)} training / {len(held_out)} held-out examples; backbone {backbone.source} "
                   f"on {backbone.device} ({process.world_size} process(es), {threads_used} each); "
                   f"{config.method}: {describe_trainable(trainer)}")
    trainer.train(training, held_out)
    if not process.is_main:
        return
    if config.method == Method.adapter.value:
        typer.echo(f"run saved in {out}; publish it with: hub publish {out}")
    else:
        typer.echo(f"{config.method} model saved in {out / 'best'} (not an adapter: not publishable); "
                   f"evaluate it with: hub eval --model {out} --data {config.data}")


def _int_list(option: str, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise HubError(f"{option} {value!r}: expected whole numbers separated by commas, e.g. 6,8,11") from None


def _mvcr_spec(enabled: bool, layers: str | None, dims: str | None, noise: float | None,
               pretrain_epochs: int | None, ae_lr: float | None) -> dict[str, dict]:
    """`{"mvcr": options}` for `TrainConfig.regularizers` (unset options take MVCR's defaults), or `{}`."""
    options = {"layers": _int_list("--mvcr-layers", layers), "dims": _int_list("--mvcr-dims", dims),
               "noise": noise, "pretrain_epochs": pretrain_epochs, "ae_lr": ae_lr}
    given = {k: v for k, v in options.items() if v is not None}
    if given and not enabled:
        raise HubError(f"--mvcr-{'/--mvcr-'.join(k.replace('_', '-') for k in given)} given without --mvcr")
    return {"mvcr": given} if enabled else {}


def list_task_types() -> None:
    """List the task types that `hub train` knows, and the adapter kinds it trains on their own."""
    from tasks import TASK_TYPES

    for name, cls in sorted(TASK_TYPES.items()):
        d = cls.defaults
        typer.echo(f"{name:<10} b={d.bottleneck:<4} lr={d.lr:g} epochs={d.epochs}  {cls.description}")
    for kind in kind_specs():
        if kind.cli_train:
            typer.echo(f"{kind.name:<10} adapter kind  {kind.description}")


def register(app: typer.Typer) -> None:
    """Add `hub train` and `hub tasks` to the `hub` app."""
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(train)
    app.command("tasks")(list_task_types)
