"""`hub train sentence_vae` options, `hub eval` of VAE and `lm` models, and
`hub vae encode|decode|sample|interpolate`."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typer.exceptions import TyperException
from typer.main import TyperGroup

from cli.common import BaseOption, DeviceOption, StoreOption, eval_out_dir, open_store
from hub.errors import HubError
from hub.store.format import AdapterMeta

vae_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Sentence VAEs: encode sentences, decode latent vectors, sample, interpolate.")

LATENT_TASK_TYPES = ("sentence_vae", "lm")  # scored by `hub.evaluation.vae_metrics`, not by decoding a split


class Recipe(str, Enum):
    adavae = "adavae"
    two_phase = "two-phase"
    none = "none"


@vae_app.command("train-options")
def train_options(
    ctx: typer.Context,
    recipe: Recipe = typer.Option(Recipe.adavae, help="adavae | two-phase | none: the defaults of the options "
                                                      "below (each one given overrides its recipe's value)"),
    nz: int = typer.Option(32, help="latent dimensions"),
    encoder_layers: Optional[int] = typer.Option(None, "--encoder-layers", help="default round(2/3·layers)"),
    pooling: str = typer.Option("latent_attn", help="latent_attn | mean | max"),
    pooling_temperature: float = typer.Option(1.0, "--pooling-temperature"),
    injection: str = typer.Option("kv_prefix", help="kv_prefix | embedding | both"),
    kv_projection: str = typer.Option("direct", "--kv-projection", help="direct (nz→L·2d) | per_layer (AdaVAE)"),
    adapter_site: str = typer.Option("block_output", "--adapter-site", help="block_output (VLM) | ffn_parallel"),
    beta_schedule: Optional[str] = typer.Option(None, "--beta-schedule", help="constant | linear | cyclical"),
    beta_max: Optional[float] = typer.Option(None, "--beta-max"),
    beta_cycles: Optional[int] = typer.Option(None, "--beta-cycles"),
    kl_floor: Optional[str] = typer.Option(None, "--kl-floor",
                                           help="none | total_hinge | per_dim_mask | per_dim_clamp"),
    kl_lambda: Optional[float] = typer.Option(None, "--kl-lambda", help="nats per latent dimension"),
    kl_normalisation: Optional[str] = typer.Option(None, "--kl-normalisation", help="per_sentence | per_token"),
    denoise: Optional[float] = typer.Option(None, help="encoder-input token deletion p (P&L)"),
    decoder_start: Optional[float] = typer.Option(None, "--decoder-start",
                                                  help="fraction of steps before decoder adapters train"),
    phase1: Optional[float] = typer.Option(None, help="fraction of steps as a β=0 autoencoder (two-phase)"),
    phase1_freeze_decoder: Optional[bool] = typer.Option(None, "--phase1-freeze-decoder/--phase1-train-decoder"),
) -> dict:
    """The sentence_vae options of `hub train sentence_vae` (run alone: print a recipe's resolved options)."""
    options = {k: v for k, v in locals().items() if k != "ctx"}
    if ctx.info_name == "train-options":
        typer.echo(json.dumps(options, indent=2, default=str))
    return options


def vae_summary(meta: AdapterMeta) -> str | None:
    """`hub show`'s line for a sentence VAE (None for other kinds)."""
    if meta.vae is None:
        return None
    vae = meta.vae
    return (f"sentence VAE: nz {vae['nz']}, encoder {vae['encoder_layers']} blocks, pooling {vae['pooling']}, "
            f"injection {vae['injection']} ({vae['kv_projection']}), adapters {vae['adapter_site']}, "
            f"recipe {meta.extra.get('recipe')}; parts {meta.extra.get('parts')}")


def parse_train_options(args: list[str]) -> dict:
    """`hub train sentence_vae`'s extra options, parsed by `train-options`; bad ones are a HubError."""
    group = typer.main.get_command(vae_app)
    command = group.commands["train-options"] if isinstance(group, TyperGroup) else group
    try:
        return command.main(args=args, prog_name="hub train sentence_vae", standalone_mode=False)
    except TyperException as err:
        raise HubError(f"{getattr(err, 'format_message', err.__str__)()} (see: hub vae train-options --help)") from None


def train_sentence_vae(args: list[str], *, data: str, name: str | None, base: str | None, bottleneck: int | None,
                       max_steps: int | None, lr: float | None, batch_size: int | None, max_length: int | None,
                       eval_every: int | None, seed: int, device: str, out: Path) -> None:
    """`hub train sentence_vae`: the shared options of `hub train` plus `parse_train_options(args)`."""
    import torch

    from hub.adapters.vae import VAEConfig, default_encoder_layers
    from hub.data import load_sentences
    from hub.model.backbone import DEFAULT_BASE, load_backbone
    from hub.store.refs import validate_name
    from hub.training.vae import VAETrainConfig, VAETrainer, prepare_vae_run_dir

    options = parse_train_options(args)
    recipe = options.pop("recipe").value
    train_sentences, eval_sentences = load_sentences(data, "train"), load_sentences(data, "validation")
    backbone = load_backbone(base or DEFAULT_BASE, device, dtype=torch.float32)
    model_config = backbone.model.config
    vae = {"nz": options.pop("nz"), "bottleneck": bottleneck or max(1, model_config.n_embd // 6),
           "encoder_layers": options.pop("encoder_layers") or default_encoder_layers(model_config.n_layer),
           **{k: options.pop(k) for k in ("pooling", "pooling_temperature", "injection", "kv_projection",
                                          "adapter_site")}}
    VAEConfig(**vae).validate(model_config.n_layer)
    config = VAETrainConfig.for_recipe(
        recipe, name=validate_name(name or "sentence_vae"), data=data, base=backbone.source, vae=vae, lr=lr,
        batch_size=batch_size, max_length=max_length, max_steps=max_steps, eval_every=eval_every, seed=seed,
        **options)
    prepare_vae_run_dir(out, config)
    trainer = VAETrainer(backbone, config, out)
    report = trainer.parameter_report()
    typer.echo(f"{len(train_sentences)} training / {len(eval_sentences)} held-out sentences; backbone "
               f"{backbone.source} on {backbone.device}; recipe {recipe}, KL normalised {config.kl_normalisation}; "
               f"{report['trainable_params']:,} trainable parameters ({report['trainable_pct']:.2f}% of the "
               f"backbone): {report['parts']}")
    trainer.train(train_sentences, eval_sentences)
    typer.echo(f"run saved in {out}; publish it with: hub publish {out}")


def evaluate_latent_model(meta: AdapterMeta, task_model_or_vae, backbone, data: str, split: str, limit: int | None,
                          iw_samples: int, out: Path) -> dict:
    """IW/exact PPL, −ELBO, Rec, KL, MI, AU and reconstruction BLEU of a VAE (or PPL of an lm adapter)."""
    from hub.data import load_sentences
    from hub.evaluation.vae_metrics import evaluate_lm, evaluate_vae

    sentences = load_sentences(data, split)[:limit]
    max_length = meta.max_length or meta.extra.get("training", {}).get("max_length") or 32
    if meta.task_type == "lm":
        metrics = evaluate_lm(task_model_or_vae, sentences, max_length)
    else:
        metrics = evaluate_vae(task_model_or_vae, backbone.model, backbone.tokenizer, sentences, iw_samples,
                               max_length)
    metrics = {**metrics, "data": data, "split": split}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shown = ("ppl", "ppl_word", "nll", "neg_elbo", "rec", "kl", "mi", "au", "recon_bleu", "sentences")
    typer.echo("  ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                         for k in shown if k in metrics))
    return {k: metrics[k] for k in shown + ("iw_samples", "data", "split") if k in metrics}


def latent_eval(ref: str | None, run: Path | None, store, base: str | None, device: str, data: str, split: str,
                limit: int | None, iw_samples: int, out: Path | None) -> bool:
    """`hub eval` of a sentence VAE or an lm adapter (from the store or a run); False for any other model."""
    from hub.adapters.vae import load_vae
    from hub.evaluation import decode as evaluation
    from hub.model.backbone import load_backbone, resolve_base
    from hub.store.export import export_dir, read_export
    from hub.store.fingerprint import check_backbone
    from tasks import make_task

    meta = store.show(ref).meta if ref else read_export(export_dir(run)).meta
    if meta.task_type not in LATENT_TASK_TYPES:
        return False
    backbone = load_backbone(resolve_base(base, dict(meta.backbone)), device)
    if meta.task_type == "lm":
        model = (evaluation.from_store(store, ref, backbone, make_task) if ref
                 else evaluation.from_run(run, base, device, make_task))
    else:
        if ref:
            tensors = store.load(ref, backbone.fingerprint).adapter_tensors
        else:
            check_backbone(meta.backbone, backbone.fingerprint, f"run '{run}'")
            tensors = read_export(export_dir(run)).adapter_tensors
        model = load_vae(tensors, meta, backbone.model.config).to(backbone.device)
    out = out or eval_out_dir(ref or Path(run).name, split)
    metrics = evaluate_latent_model(meta, model, backbone, data, split, limit, iw_samples, out)
    if ref:
        store.update_metrics(ref, {split: metrics})
        typer.echo(f"recorded in the metadata of {store.show(ref).ref}")
    typer.echo(f"metrics in {out / 'metrics.json'}")
    return True


# -- hub vae encode | decode | sample | interpolate -----------------------------------------------------------

TaskOption = typer.Option(..., "--task", help="sentence VAE adapter NAME or NAME@VERSION")
MaxNewTokens = typer.Option(None, "--max-new-tokens")
Temperature = typer.Option(0.0, help="0 = greedy")
Seed = typer.Option(None, help="sampling seed (prior samples and temperature > 0)")


def _served(task: str, store: str, base: str | None, device: str):
    """An engine with the one VAE on its backbone, and that VAE's operations."""
    from hub.serving.engine import Engine
    from hub.serving.vae import VaeOps
    from hub.store.fingerprint import backbone_for_adapters
    from tasks import make_task

    adapter_store = open_store(store)
    backbone = backbone_for_adapters(adapter_store, [task], base, device)
    engine = Engine(backbone, make_task)
    adapter = engine.manager.add_adapter(adapter_store.load(task, backbone.fingerprint))
    return engine, VaeOps(engine, adapter)


def _decode(engine, ops, z, max_new_tokens: int | None, temperature: float, seed: int | None) -> list[str]:
    from hub.serving.batch import decode_to_completion
    from hub.serving.sampling import sampling_params

    params = sampling_params(ops.adapter.task.defaults.max_new_tokens, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed)
    return [s.text.strip() for s in decode_to_completion(engine, ops.sequences(z, params))]


@vae_app.command()
def encode(texts: list[str] = typer.Argument(..., help="sentences"), task: str = TaskOption,
           store: str = StoreOption,
           base: Optional[str] = BaseOption, device: str = DeviceOption) -> None:
    """μ and log σ² of each sentence (JSON)."""
    _, ops = _served(task, store, base, device)
    codes = ops.encode(texts)
    typer.echo(json.dumps({"task": ops.task, "nz": ops.nz, "mu": codes.mu, "logvar": codes.logvar}))


@vae_app.command()
def decode(z: str = typer.Argument(..., help="JSON list of latent vectors, e.g. '[[0.1, ...]]'"),
           task: str = TaskOption, max_new_tokens: Optional[int] = MaxNewTokens, temperature: float = Temperature,
           seed: Optional[int] = Seed, store: str = StoreOption,
           base: Optional[str] = BaseOption, device: str = DeviceOption) -> None:
    """Decode latent vectors into sentences, one per line."""
    try:
        vectors = json.loads(z)
    except ValueError as err:
        raise HubError(f"z must be a JSON list of vectors: {err}") from None
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        raise HubError("z must be a JSON list of vectors (lists of numbers)")
    engine, ops = _served(task, store, base, device)
    typer.echo("\n".join(_decode(engine, ops, ops.check_z(vectors), max_new_tokens, temperature, seed)))


@vae_app.command()
def sample(task: str = TaskOption, n: int = typer.Option(5, "-n", help="sentences to sample from the prior"),
           max_new_tokens: Optional[int] = MaxNewTokens, temperature: float = Temperature,
           seed: Optional[int] = Seed, store: str = StoreOption,
           base: Optional[str] = BaseOption, device: str = DeviceOption) -> None:
    """Decode z ~ N(0, I), one sentence per line."""
    engine, ops = _served(task, store, base, device)
    typer.echo("\n".join(_decode(engine, ops, ops.prior(n, ops.nz, seed), max_new_tokens, temperature, seed)))


@vae_app.command()
def interpolate(a: str = typer.Argument(...), b: str = typer.Argument(...), task: str = TaskOption,
                steps: int = typer.Option(5, help="points from μ(a) to μ(b), both included"),
                max_new_tokens: Optional[int] = MaxNewTokens, temperature: float = Temperature,
                seed: Optional[int] = Seed, store: str = StoreOption,
                base: Optional[str] = BaseOption, device: str = DeviceOption) -> None:
    """The sentences along the line from μ(a) to μ(b), one per line."""
    engine, ops = _served(task, store, base, device)
    typer.echo("\n".join(_decode(engine, ops, ops.path(a, b, steps), max_new_tokens, temperature, seed)))
