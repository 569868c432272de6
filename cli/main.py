"""`hub`: train, publish, list, show, rm, generate, serve. Errors print one clear line, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cli.options import BaseOption, DeviceOption, StoreOption, TrainBaseOption
from cli.vae import vae_app
from hub.errors import HubError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-task adapter hub for one shared, frozen GPT-2.")

ThreadsOption = typer.Option(None, "--threads", min=1,
                             help="torch threads (default: OMP_NUM_THREADS if set, else the physical cores)")


class DType(str, Enum):
    """The backbone's dtype when serving; adapters always compute in float32."""

    auto = "auto"  # float32 on the CPU, bfloat16 (else float16) on a GPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DTypeOption = typer.Option(DType.auto, "--dtype", help="backbone dtype: auto = float32 on CPU, bfloat16 on GPU")


class BankDType(str, Enum):
    """What resident VLM adapter weights are stored in; their arithmetic stays float32."""

    float32 = "float32"
    float16 = "float16"  # half the bytes a decode step reads (docs/BENCHMARKS.md: speed and agreement)
    bfloat16 = "bfloat16"


class Method(str, Enum):
    """What `hub train` trains: the VLM adapter, or a baseline of `hub.training.baselines` to compare it with."""

    adapter = "adapter"
    full = "full"
    lora = "lora"


class ExportFormat(str, Enum):
    """What `hub export` writes: `adapterhub`, a folder plain transformers + adapters load (`hub.interop`)."""

    adapterhub = "adapterhub"


def _store(location: str):
    from hub.store.backends import open_store

    return open_store(location)


def _set_threads(threads: int | None, processes: int = 1) -> str:
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
        threads, why = max(1, cores // processes), "physical cores" + (f" / {processes} processes" if processes > 1
                                                                         else "")
    torch.set_num_threads(threads)
    return f"{threads} torch threads ({why})"


def _torch_dtype(dtype: DType):
    import torch

    return None if dtype is DType.auto else getattr(torch, dtype.value)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
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

    `sentence_vae` takes more options: hub vae train-options --help. Data-parallel with
    `hub train --nproc N ...` or `accelerate launch --num_processes N -m hub train ...`."""
    import torch

    from hub.training import distributed

    if nproc > 1 and distributed.launched_world_size() == 1:
        raise typer.Exit(subprocess.call(distributed.relaunch_command(nproc, sys.argv[1:])))
    if note := distributed.single_process_accelerate_note():
        typer.echo(note, err=True)
    distributed.init_process_group(device)

    from hub.model.backbone import load_backbone
    from hub.training.baselines import default_lr, describe_trainable, make_trainer
    from hub.store.catalog import validate_name
    from hub.training.subset import check_subset_size
    from hub.training.trainer import TrainConfig, prepare_run_dir
    from tasks import make_task

    if task_type == "sentence_vae":
        from cli.vae import train_sentence_vae

        unsupported = {"--mvcr": mvcr, "--method": method != Method.adapter, "--nproc": nproc > 1,
                       "--train-examples": train_examples is not None}
        if any(unsupported.values()):
            raise HubError(f"sentence_vae training does not support {', '.join(k for k, v in unsupported.items() if v)}"
                           f" (its options: hub vae train-options --help)")
        typer.echo(f"sentence_vae: {_set_threads(threads)}")

        return train_sentence_vae(ctx.args, data=data, name=name, base=base, bottleneck=bottleneck,
                                  max_steps=max_steps, lr=lr, batch_size=batch_size, max_length=max_length,
                                  eval_every=eval_every, seed=seed, device=device, out=out)
    if ctx.args:
        raise HubError(f"unknown option(s) {' '.join(ctx.args)} for task type {task_type!r}")
    options = {k: v for k, v in {"input_field": input_field, "target_field": target_field,
                                 "source_lang": source_lang, "target_lang": target_lang}.items() if v}
    task = make_task(task_type, options)
    d = task.defaults
    config = TrainConfig(
        name=validate_name(name or task_type), task_type=task_type, task_config=task.config(), data=data,
        bottleneck=bottleneck or d.bottleneck, lr=lr or default_lr(task, method.value),
        batch_size=batch_size or d.batch_size, grad_accum=grad_accum or d.grad_accum,
        max_length=max_length or d.max_length, epochs=epochs or d.epochs, max_steps=max_steps, eval_every=eval_every,
        seed=seed, base=base, method=method.value,
        train_examples=train_examples, data_seed=data_seed,
        regularizers=_mvcr_spec(mvcr, mvcr_layers, mvcr_dims, mvcr_noise, mvcr_pretrain_epochs, mvcr_ae_lr),
    )
    training = task.load_examples(data, "train")
    held_out = task.load_examples(data, "validation")
    backbone = load_backbone(config.base, device, dtype=torch.float32)
    config.max_length = min(config.max_length, backbone.n_positions)
    if train_examples is not None:
        check_subset_size(train_examples, len(training))
    process = distributed.DataParallel.current(backbone.device)
    threads_used = _set_threads(threads, process.world_size)
    trainer = make_trainer(backbone, task, config, out)  # first: it checks and completes the MVCR settings
    process.on_main(lambda: prepare_run_dir(out, config))
    if process.is_main:
        typer.echo(f"{len(training)} training / {len(held_out)} held-out examples; backbone {backbone.source} "
                   f"on {backbone.device} ({process.world_size} process(es), {threads_used} each); "
                   f"{method.value}: {describe_trainable(trainer)}")
    trainer.train(training, held_out)
    if not process.is_main:
        return
    if method == Method.adapter:
        typer.echo(f"run saved in {out}; publish it with: hub publish {out}")
    else:
        typer.echo(f"{method.value} model saved in {out / 'best'} (not an adapter: not publishable); "
                   f"evaluate it with: hub eval --model {out} --data {data}")


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


@app.command()
def publish(
    run_dir: Path = typer.Argument(..., help="a run directory (its best/ is published) or an export folder"),
    name: Optional[str] = typer.Option(None, "--name"),
    version: Optional[str] = typer.Option(None, "--version"),
    store: str = StoreOption,
) -> None:
    """Publish a trained adapter into the store (atomic; versions are kept)."""
    from hub.store.catalog import export_dir

    export = export_dir(run_dir)
    if (export / "task_meta.json").is_file():  # hub.training.baselines.BASELINE_META, not imported: it loads slowly
        raise HubError(f"{run_dir} is a --method full or lora baseline (a separate model), not an adapter: the "
                       f"store holds adapters only. Evaluate it with: hub eval --model {run_dir} --data ...")
    stored = _store(store).publish(export, name=name, version=version)
    typer.echo(f"published {stored.ref} to {stored.path}")


@app.command("list")
def list_adapters(store: str = StoreOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """List published adapters and their versions."""
    rows = [_list_row(s) for s in _store(store).list()]
    if as_json:
        return _print_json(rows)
    if not rows:
        typer.echo(f"no adapters in {store}")
    for r in rows:
        if r["versions"]:
            typer.echo(f"{r['name']:<24} {r['task_type']:<10} b={r['bottleneck']:<4} {r['trainable_pct']:.2f}%  "
                       f"versions {', '.join(r['versions'])}")
        for skipped in r["skipped"]:
            typer.echo(f"{r['name']:<24} skipped {skipped['version'] or '(all)'}: {skipped['reason']}")


def _list_row(summary) -> dict:
    """One `hub list` row: the newest usable version's metadata, and every skipped version with its reason."""
    skipped = [{"version": k.version, "reason": k.reason} for k in summary.skipped]
    row = {"name": summary.name, "versions": [v.version for v in summary.versions], "skipped": skipped}
    if summary.versions:
        meta = summary.latest.meta
        row.update(latest=summary.latest.version, task_type=meta.task_type, bottleneck=meta.bottleneck,
                   trainable_pct=round(meta.trainable_pct, 3))
    return row


@app.command()
def show(ref: str = typer.Argument(..., help="NAME or NAME@VERSION"), store: str = StoreOption,
         as_json: bool = typer.Option(False, "--json"),
         plot: bool = typer.Option(False, "--plot", help="also write the training curve (its train_log.json) as PNG"),
         plot_out: Optional[Path] = typer.Option(None, "--plot-out", help="PNG path (default NAME-VERSION-curve.png)"),
         ) -> None:
    """Show one adapter version's metadata (and, with --plot, draw its training curve)."""
    from cli.vae import vae_summary

    stored = _store(store).show(ref)
    meta = stored.meta
    if as_json:
        _print_json(meta.to_dict())
    else:
        typer.echo(f"{stored.ref}  ({meta.task_type}, created {meta.created_at})\n"
                   f"  bottleneck {meta.bottleneck}, {meta.trainable_params:,} trainable parameters "
                   f"({meta.trainable_pct:.2f}% of the backbone)\n"
                   f"  {vae_summary(meta) or 'special tokens ' + ' '.join(meta.special_tokens)}\n"
                   f"  backbone {meta.backbone.get('source', '?')}\n  metrics {json.dumps(meta.to_dict()['metrics'])}")
        for name, settings in meta.to_dict().get("training", {}).get("regularizers", {}).items():
            typer.echo(f"  trained with {name} {json.dumps(settings)}")
    if plot:
        from hub.plots import training_curve_png, write_png

        stored, log = _store(store).training_log(stored.ref)
        path = write_png(training_curve_png(log, f"{stored.ref}: training curve"),
                         plot_out or Path(f"{stored.name}-{stored.version}-curve.png"))
        typer.echo(f"training curve written to {path}", err=as_json)


@app.command("export")
def export(ref: str = typer.Argument(..., help="NAME or NAME@VERSION"),
           out: Path = typer.Option(..., "--out", help="folder to write (new or empty)"),
           export_format: ExportFormat = typer.Option(ExportFormat.adapterhub, "--format"),
           store: str = StoreOption) -> None:
    """Export a stored version for use outside the hub: load it with hub.interop.load_into_adapters."""
    from hub.interop import export_adapterhub

    loaded = _store(store).load(ref)  # verifies the checksums first
    if not isinstance(loaded.path, Path):
        raise HubError(f"hub export reads a local store; {store} is an object store: publish the run to a local "
                       f"store (hub publish RUN --store FOLDER) and export from there")
    path = export_adapterhub(loaded.path, out)
    typer.echo(f"exported {loaded.ref} ({export_format.value}) to {path}; load it with:\n"
               f"  task = hub.interop.load_into_adapters(GPT2LMHeadModel.from_pretrained(BASE), '{path}')")


@app.command()
def rm(ref: str = typer.Argument(..., help="NAME (all versions) or NAME@VERSION"), store: str = StoreOption) -> None:
    """Remove an adapter version, or all versions of a name."""
    for removed in _store(store).remove(ref):
        typer.echo(f"removed {removed}")


store_app = typer.Typer(no_args_is_help=True, help="Store maintenance.")
app.add_typer(store_app, name="store")


@store_app.command("gc")
def store_gc(store: str = StoreOption,
             older_than: float = typer.Option(3600.0, "--older-than", help="seconds; younger leftovers may be a "
                                              "publish in progress")) -> None:
    """Remove staging and trash folders left by killed publishes and removals."""
    removed = _store(store).gc(older_than)
    for path in removed:
        typer.echo(f"removed {path}")
    typer.echo(f"{len(removed)} leftovers removed from {store}")


def _backbone_for(store, refs: list[str], base: str | None, device: str, dtype: DType = DType.auto):
    """The --base given, else HUB_BASE, else the backbone the (first) adapter was trained on, which must then
    match that adapter's recorded fingerprint (hub.json names the path; the weights must be the same)."""
    from hub.errors import BackboneMismatchError
    from hub.model.backbone import load_backbone, resolve_base
    from hub.store.catalog import fingerprint_mismatch

    base = base or os.environ.get("HUB_BASE")
    stored = store.show(refs[0]) if refs and not base else None
    trained_on = dict(stored.meta.backbone) if stored else None
    backbone = load_backbone(resolve_base(base, trained_on), device, dtype=_torch_dtype(dtype))
    problem = trained_on and fingerprint_mismatch(trained_on, backbone.fingerprint)
    if problem:
        raise BackboneMismatchError(f"the backbone named in {stored.ref}'s hub.json is not the one it was trained "
                                    f"on: the adapter {problem}. Pass the right one with --base")
    return backbone


@app.command()
def generate(
    text: str = typer.Argument(..., help="the task input, e.g. an E2E meaning representation"),
    task: str = typer.Option(..., "--task", help="adapter NAME or NAME@VERSION"),
    store: str = StoreOption,
    base: Optional[str] = BaseOption,
    device: str = DeviceOption,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None),
    min_tokens: int = typer.Option(0, "--min-tokens", min=0, help="no end token before this many tokens"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="decode to --max-new-tokens"),
    threads: Optional[int] = ThreadsOption,
    dtype: DType = DTypeOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate with one task adapter (KV cache; stops at the task's end token)."""
    from hub.serving.batch import decode_to_completion
    from hub.serving.engine import Engine
    from hub.serving.sampling import sampling_params
    from tasks import make_task

    _set_threads(threads)
    adapter_store = _store(store)
    backbone = _backbone_for(adapter_store, [task], base, device, dtype)
    engine = Engine(backbone, make_task)
    resident = engine.manager.add_adapter(adapter_store.load(task, backbone.fingerprint))
    params = sampling_params(resident.task.defaults.max_new_tokens, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             min_tokens=min_tokens, ignore_eos=ignore_eos)
    sequence = decode_to_completion(engine, [engine.new_sequence(resident, text, params)])[0]
    if as_json:
        return _print_json({"task": resident.name, "version": resident.version, "text": sequence.text.strip(),
                            "finish_reason": sequence.finish_reason,
                            "usage": {"prompt_tokens": len(sequence.prompt_ids),
                                      "completion_tokens": len(sequence.output_ids)}})
    typer.echo(sequence.text.strip())


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    store: str = StoreOption,
    base: Optional[str] = BaseOption,
    device: str = DeviceOption,
    max_batch: int = typer.Option(32, "--max-batch", help="most sequences decoded together"),
    max_queue: int = typer.Option(256, "--max-queue", help="waiting requests before 429"),
    max_resident: Optional[int] = typer.Option(None, "--max-resident", min=1, help="adapters on the device (LRU)"),
    max_cpu_adapters: Optional[int] = typer.Option(
        None, "--max-cpu-adapters", min=0, help="weights of adapters off the device kept in CPU memory (LRU); the "
        "others are read from the store when a request needs them (default: all, read at start-up)"),
    request_timeout: float = typer.Option(120.0, "--request-timeout", help="seconds"),
    watch_interval: float = typer.Option(0.5, "--watch-interval", help="store polling period, 0 = off"),
    store_timeout: float = typer.Option(30.0, "--store-timeout", min=0.1,
                                        help="seconds a store call or an adapter's load may take before 503"),
    prefill_chunk: int = typer.Option(256, "--prefill-chunk", min=1,
                                      help="prompt tokens per row and step; longer prompts prefill in chunks"),
    threads: Optional[int] = ThreadsOption,
    dtype: DType = DTypeOption,
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1, help="larger request bodies get 413"),
    bank_dtype: BankDType = typer.Option(BankDType.float32, "--bank-dtype",
                                         help="resident adapters' weights: float32, or float16/bfloat16 for half "
                                         "the bytes per decode step (arithmetic stays float32)"),
    ray: bool = typer.Option(False, "--ray", help="serve as a Ray Serve application: engine replicas, each "
                             "task routed to a replica that holds it (docs/DEPLOY.md)"),
    replicas: int = typer.Option(2, "--replicas", min=1, help="--ray: engine replicas"),
    address: Optional[str] = typer.Option(None, "--address", help="--ray: the cluster to join, auto or "
                                          "ray://HOST:10001 (default: start a local one)"),
    max_tasks_per_replica: int = typer.Option(8, "--max-tasks-per-replica", min=1,
                                              help="--ray: tasks one replica keeps loaded (LRU)"),
    replica_gpus: float = typer.Option(0.0, "--replica-gpus", min=0.0, help="--ray: GPUs per engine replica"),
) -> None:
    """Serve every published adapter over HTTP, fusing requests of different tasks in one batch."""
    import uvicorn

    from hub.serving.service import ServiceSettings
    from server.app import create_app

    settings = ServiceSettings(max_batch=max_batch, max_queue=max_queue, max_resident=max_resident,
                               max_cpu_adapters=max_cpu_adapters, bank_dtype=bank_dtype.value,
                               request_timeout=request_timeout, watch_interval=watch_interval,
                               prefill_chunk=prefill_chunk, store_timeout=store_timeout)
    if ray:
        from server.ray_serve import RayServeOptions, serve_on_ray

        options = RayServeOptions(store=store, base=base, device=device, dtype=dtype.value, threads=threads,
                                  replicas=replicas, max_tasks_per_replica=max_tasks_per_replica,
                                  replica_gpus=replica_gpus, service=settings, max_body_bytes=max_body_bytes)
        return serve_on_ray(options, address, host, port)
    threads_used = _set_threads(threads)
    adapter_store = _store(store)
    refs = [s.latest.ref for s in adapter_store.list() if s.versions]
    backbone = _backbone_for(adapter_store, refs, base, device, dtype)
    typer.echo(f"hub serve: {threads_used}, backbone {str(backbone.dtype).removeprefix('torch.')} "
               f"on {backbone.device}, adapter bank {bank_dtype.value}", err=True)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the previous handler: exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(create_app(backbone, adapter_store, settings, max_body_bytes), host=host, port=port,
                log_level="info")


@app.command("eval")
def evaluate(
    ref: Optional[str] = typer.Argument(None, help="adapter NAME or NAME@VERSION in the store"),
    data: str = typer.Option(..., "--data", help="HF dataset id, or a local file or folder"),
    split: str = typer.Option("test", help="train | validation | test"),
    limit: Optional[int] = typer.Option(None, help="evaluate the first N unique inputs only"),
    run: Optional[Path] = typer.Option(None, "--run", help="evaluate a run's best/ export before publishing"),
    model: Optional[Path] = typer.Option(None, "--model", help="evaluate a --method full or lora run"),
    store: str = StoreOption,
    base: Optional[str] = BaseOption,
    device: str = DeviceOption,
    batch_size: int = typer.Option(16, "--batch-size"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="default: the task's"),
    num_beams: int = typer.Option(1, "--num-beams", help="1 = greedy (VLM's decoder)"),
    length_penalty: float = typer.Option(1.0, "--length-penalty", help="beam search only"),
    no_repeat_ngram_size: int = typer.Option(0, "--no-repeat-ngram-size"),
    out: Optional[Path] = typer.Option(None, "--out", help="default: runs/eval-NAME-SPLIT"),
    iw_samples: int = typer.Option(100, "--iw-samples", help="sentence_vae: posterior samples per sentence"),
) -> None:
    """Decode a split with one model and score it with the task's metric (outputs.txt, metrics.json/.md).
    Sentence VAEs and lm adapters get perplexity, -ELBO, KL, MI, AU and reconstruction BLEU instead."""
    from cli.vae import latent_eval
    from hub.evaluation import decode as evaluation

    if [ref, run, model].count(None) != 2:
        raise HubError("give exactly one of: an adapter NAME[@VERSION], --run RUN_DIR or --model RUN_DIR")
    if model is None and latent_eval(ref, run, _store(store) if ref else None, base, device, data, split, limit, iw_samples, out):
        return
    if model is not None:
        from hub.training.baselines import load_baseline

        task_model = load_baseline(model, base, device)
    elif run is not None:
        task_model = evaluation.from_run(run, base, device)
    else:
        adapter_store = _store(store)
        task_model = evaluation.from_store(adapter_store, ref, _backbone_for(adapter_store, [ref], base, device))
    decoding = evaluation.Decoding(max_new_tokens or task_model.task.defaults.max_new_tokens, num_beams,
                                   length_penalty, no_repeat_ngram_size, batch_size)
    result = evaluation.evaluate(task_model, data, split, decoding, limit)
    out = out or Path("runs") / f"eval-{(ref or Path(run or model).name).replace('@', '-')}-{split}"
    evaluation.write_result(result, out)
    typer.echo(result.markdown())
    if task_model.store_ref:
        evaluation.record_in_store(adapter_store, task_model.store_ref, result)
        typer.echo(f"recorded in the metadata of {task_model.store_ref}")
    typer.echo(f"outputs and metrics in {out}")


@app.command("tasks")
def list_task_types() -> None:
    """List the task types that `hub train` knows."""
    from tasks import TASK_TYPES

    for name, cls in sorted(TASK_TYPES.items()):
        d = cls.defaults
        typer.echo(f"{name:<10} b={d.bottleneck:<4} lr={d.lr:g} epochs={d.epochs}  {cls.description}")


app.add_typer(vae_app, name="vae")


def main() -> None:
    try:
        app()
    except HubError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
