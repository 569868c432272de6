"""`hub eval`: decode a split with one model and score it (a store adapter, a run's export, or a baseline run)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from cli.common import BaseOption, DeviceOption, StoreOption, eval_out_dir, open_store
from hub.errors import HubError


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
    from hub.evaluation import decode as evaluation

    if [ref, run, model].count(None) != 2:
        raise HubError("give exactly one of: an adapter NAME[@VERSION], --run RUN_DIR or --model RUN_DIR")
    adapter_store = open_store(store) if ref else None
    scorer = _scorer(ref, run, adapter_store) if model is None else None
    if scorer is not None:
        return scorer(ref=ref, run=run, store=adapter_store, base=base, device=device, data=data, split=split,
                      limit=limit, iw_samples=iw_samples, out=out)
    task_model = _task_model(ref, run, model, adapter_store, base, device)
    decoding = evaluation.Decoding(max_new_tokens or task_model.task.defaults.max_new_tokens, num_beams,
                                   length_penalty, no_repeat_ngram_size, batch_size)
    result = evaluation.evaluate(task_model, data, split, decoding, limit)
    out = out or eval_out_dir(ref or Path(run or model).name, split)
    evaluation.write_result(result, out)
    typer.echo(result.markdown())
    if adapter_store is not None and task_model.store_ref:
        evaluation.record_in_store(adapter_store, task_model.store_ref, result)
        typer.echo(f"recorded in the metadata of {task_model.store_ref}")
    typer.echo(f"outputs and metrics in {out}")


def _scorer(ref: str | None, run: Path | None, adapter_store) -> Callable[..., None] | None:
    """What scores a stored or exported model instead of decoding a split: its adapter kind's `hub eval` hook
    (a sentence VAE's), or perplexity for an lm adapter; None: decode it with its task."""
    from functools import partial

    from cli.vae import LM, evaluate_lm_command
    from hub.adapters.registry import kind_spec
    from hub.adapters.spec import load_hook
    from hub.store.export import export_dir, read_export

    meta = adapter_store.show(ref).meta if ref else read_export(export_dir(run)).meta
    hook = kind_spec(meta.adapter_kind).cli_eval or (evaluate_lm_command if meta.task_type == LM else None)
    return partial(load_hook(hook), meta) if hook else None


def _task_model(ref: str | None, run: Path | None, model: Path | None, adapter_store, base: str | None, device: str):
    """The model `hub eval` decodes: a baseline run (--model), a run's export (--run) or a store adapter."""
    from hub.evaluation import decode as evaluation
    from tasks import make_task

    if model is not None:
        from hub.training.baselines import load_baseline

        return load_baseline(model, base, device, make_task)
    if run is not None:
        return evaluation.from_run(run, base, device, make_task)
    from hub.store.fingerprint import backbone_for_adapters

    backbone = backbone_for_adapters(adapter_store, [ref], base, device)
    return evaluation.from_store(adapter_store, ref, backbone, make_task)


def register(app: typer.Typer) -> None:
    """Add `hub eval` to the `hub` app."""
    app.command("eval")(evaluate)
