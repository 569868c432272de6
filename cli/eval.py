"""`hub eval`: decode a split with one model and score it (a store adapter, a run's export, or a baseline run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import BaseOption, DeviceOption, StoreOption, eval_out_dir, open_store
from cli.vae import latent_eval
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
    if model is None and latent_eval(ref, run, adapter_store, base, device, data, split, limit, iw_samples, out):
        return
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
