"""The `sentence_vae` kind's CLI hooks (`hub.adapters.vae_kind.SPEC`): `hub train sentence_vae` and its options,
`hub eval` of a VAE (and of an `lm` adapter, its baseline), and `hub vae encode|decode|sample|interpolate`."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typer.exceptions import TyperException
from typer.main import TyperGroup

from cli.common import BaseOption, DeviceOption, StoreOption, eval_out_dir, open_store, set_threads
from hub.adapters.vae_kind import SENTENCE_VAE, max_length
from hub.errors import HubError
from hub.store.format import AdapterMeta

vae_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Sentence VAEs: encode sentences, decode latent vectors, sample, interpolate.")

LM = "lm"  # the task type of the VAE's baseline, scored by perplexity too (`hub.evaluation.vae_metrics`)
# `hub train` options a sentence VAE's trainer has no use for (given: refused), as option -> "was it given?"
VLM_ONLY_OPTIONS: dict[str, Callable[[Any], bool]] = {
    "--mvcr": bool, "--method": lambda method: method != "adapter", "--nproc": lambda n: n > 1,
    "--train-examples": lambda n: n is not None}


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


def parse_train_options(args: list[str]) -> dict:
    """`hub train sentence_vae`'s extra options, parsed by `train-options`; bad ones are a HubError."""
    group = typer.main.get_command(vae_app)
    command = group.commands["train-options"] if isinstance(group, TyperGroup) else group
    try:
        return command.main(args=args, prog_name="hub train sentence_vae", standalone_mode=False)
    except TyperException as err:
        raise HubError(f"{getattr(err, 'format_message', err.__str__)()} (see: hub vae train-options --help)") from None


def train_command(args: list[str], options: dict[str, Any]) -> None:
    """`hub train sentence_vae` (the kind's CLI train hook): `options` are every option of `hub train`."""
    given = [flag for flag, was_given in VLM_ONLY_OPTIONS.items() if was_given(options[flag[2:].replace("-", "_")])]
    if given:
        raise HubError(f"sentence_vae training does not support {', '.join(given)}"
                       f" (its options: hub vae train-options --help)")
    typer.echo(f"sentence_vae: {set_threads(options['threads'])}")
    shared = ("data", "name", "base", "bottleneck", "max_steps", "lr", "batch_size", "max_length", "eval_every",
              "seed", "device", "out")
    train_sentence_vae(args, **{k: options[k] for k in shared})


def train_sentence_vae(args: list[str], *, data: str, name: str | None, base: str | None, bottleneck: int | None,
                       max_steps: int | None, lr: float | None, batch_size: int | None, max_length: int | None,
                       eval_every: int | None, seed: int, device: str, out: Path) -> None:
    """`hub train sentence_vae`: the shared options of `hub train` plus `parse_train_options(args)`."""
    import torch

    from hub.adapters.vae import VAEConfig, default_encoder_layers
    from hub.data import load_sentences
    from hub.model.backbone import DEFAULT_BASE, load_backbone
    from hub.store.refs import validate_name
    from hub.training.run_dir import RunDir
    from hub.training.vae import VAETrainConfig, VAETrainer

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
        recipe, name=validate_name(name or SENTENCE_VAE), data=data, base=backbone.source, vae=vae, lr=lr,
        batch_size=batch_size, max_length=max_length, max_steps=max_steps, eval_every=eval_every, seed=seed,
        **options)
    RunDir(out).prepare(config)
    trainer = VAETrainer(backbone, config, out)
    report = trainer.parameter_report()
    typer.echo(f"{len(train_sentences)} training / {len(eval_sentences)} held-out sentences; backbone "
               f"{backbone.source} on {backbone.device}; recipe {recipe}, KL normalised {config.kl_normalisation}; "
               f"{report['trainable_params']:,} trainable parameters ({report['trainable_pct']:.2f}% of the "
               f"backbone): {report['parts']}")
    trainer.train(train_sentences, eval_sentences)
    typer.echo(f"run saved in {out}; publish it with: hub publish {out}")


def evaluate_command(meta: AdapterMeta, *, ref: str | None, run: Path | None, store, base: str | None, device: str,
                     iw_samples: int, **target: Any) -> None:
    """`hub eval` of a sentence VAE (the kind's CLI eval hook): IW/exact PPL, −ELBO, Rec, KL, MI, AU and
    reconstruction BLEU of `target`'s data split, from the store (`ref`) or a run's export."""
    from hub.adapters.vae import load_vae
    from hub.evaluation.vae_metrics import evaluate_vae
    from hub.store.export import export_dir, read_export
    from hub.store.fingerprint import check_backbone

    backbone = _eval_backbone(meta, base, device)
    if ref:
        tensors = store.load(ref, backbone.fingerprint).adapter_tensors
    else:
        check_backbone(meta.backbone, backbone.fingerprint, f"run '{run}'")
        tensors = read_export(export_dir(run)).adapter_tensors
    vae = load_vae(tensors, meta, backbone.model.config).to(backbone.device)
    _score(meta, lambda sentences, length: evaluate_vae(vae, backbone.model, backbone.tokenizer, sentences,
                                                         iw_samples, length), ref=ref, run=run, store=store, **target)


def evaluate_lm_command(meta: AdapterMeta, *, ref: str | None, run: Path | None, store, base: str | None,
                        device: str, iw_samples: int, **target: Any) -> None:
    """`hub eval` of an lm adapter (the sentence VAE's baseline): perplexity, not a decoded split
    (`iw_samples` is a VAE's)."""
    from hub.evaluation import decode as evaluation
    from hub.evaluation.vae_metrics import evaluate_lm
    from tasks import make_task

    backbone = _eval_backbone(meta, base, device)
    model = (evaluation.from_store(store, ref, backbone, make_task) if ref
             else evaluation.from_run(run, base, device, make_task))
    _score(meta, lambda sentences, length: evaluate_lm(model, sentences, length), ref=ref, run=run, store=store,
           **target)


def _eval_backbone(meta: AdapterMeta, base: str | None, device: str):
    from hub.model.backbone import load_backbone, resolve_base

    return load_backbone(resolve_base(base, dict(meta.backbone)), device)


def _score(meta: AdapterMeta, scores: Callable[[list[str], int], dict], *, ref: str | None, run: Path | None, store,
           data: str, split: str, limit: int | None, out: Path | None) -> None:
    """`scores(sentences, max_length)` of a split: metrics.json, one line of them, and the store's record."""
    from hub.data import load_sentences

    out = out or eval_out_dir(ref or Path(run or "").name, split)
    metrics = {**scores(load_sentences(data, split)[:limit], max_length(meta)), "data": data, "split": split}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shown = ("ppl", "ppl_word", "nll", "neg_elbo", "rec", "kl", "mi", "au", "recon_bleu", "sentences")
    typer.echo("  ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                         for k in shown if k in metrics))
    if ref:
        recorded = {k: metrics[k] for k in shown + ("iw_samples", "data", "split") if k in metrics}
        store.update_metrics(ref, {split: recorded})
        typer.echo(f"recorded in the metadata of {store.show(ref).ref}")
    typer.echo(f"metrics in {out / 'metrics.json'}")


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
