"""Sentence-VAE quality on the stand-in GPT-2: the `lm` adapter vs `--recipe adavae | two-phase | none` per data set.

Every row trains on the data set's training split for the same steps and batch (the `lm` adapter's bottleneck is
chosen so its trainable size matches the VAE bundle's), keeps its best held-out checkpoint, and is scored on the
first `--test-sentences` test sentences by `hub.evaluation.vae_metrics` (the code behind `hub eval`): IW PPL with
`--iw-samples` samples, −ELBO, Rec, KL, MI, AU, reconstruction BLEU. Rows go into a JSON file (`--results`) as they
finish and `docs/VAE.md` (+ one KL/AU plot per data set) is rewritten after each, so a partial run still reports;
data sets may run as parallel processes (`--datasets snli` & `--datasets ptb` ...): rows merge under a lock.

    python -m bench.vae_quality                                      # every data set and row
    python -m bench.vae_quality --datasets snli --steps 20 --test-sentences 10 --iw-samples 10 \\
        --results /tmp/v/vae.json --doc /tmp/v/VAE.md --work /tmp/v/runs   # a smoke run
    python -m bench.vae_quality --datasets snli --rows adavae lm --steps 3000 --curve-points 12   # a long run
    python -m bench.vae_quality --datasets snli --rows adavae --steps 400 --word-dropout 0.5     # a variant row
    python -m bench.vae_quality --rescore --datasets snli --work runs/vae_quality   # lm PPL, VAEs' use of z again

With `--curve-points K` a row is also scored on the test sentences at K evenly spaced steps (IW PPL, −ELBO, KL, MI,
AU, reconstruction BLEU; the `lm` row: exact PPL) and goes into `--long-results` instead: `docs/VAE.md` shows those
rows as curves over steps in a section of their own, next to the short runs' table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from bench.common import SHARED, machine
from hub.adapters.vae import analogy_point, interpolation_path, load_vae
from hub.adapters.vlm import adapter_parameter_count
from hub.data import load_sentences
from hub.evaluation.decode import TaskModel, from_run
from hub.evaluation.vae_metrics import decoder_use_of_z, evaluate_lm, evaluate_vae
from hub.model.backbone import load_backbone
from hub.store.export import read_export
from hub.training.run_dir import RunDir
from hub.training.trainer import TrainConfig, Trainer
from hub.training.vae import RECIPES, VAETrainConfig, VAETrainer
from tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
BASE = SHARED / "models" / "gpt2-standin"
DATASETS = {"snli": "data/snli_sentences", "ptb": "data/ptb", "yelp": "data/vae_text/yelp_yahoo_text_autoencoders/yelp"}
ROWS = ("lm", "adavae", "two-phase", "none")
ROW_LABELS = {"lm": "(i) lm adapter", "adavae": "(ii) --recipe adavae", "two-phase": "(iii) --recipe two-phase",
              "none": "(iv) no remedy (β = 1, no floor)"}
SHOWN_PATHS = 5
CURVE_KEYS = ("ppl", "nll", "neg_elbo", "rec", "kl", "mi", "au", "recon_bleu", "sentences")


def fresh_run(dataset: str, row: str, work: Path):
    """The data path, an emptied run directory and a freshly loaded stand-in for one row."""
    run_dir = work / f"{dataset}-{row}"
    shutil.rmtree(run_dir, ignore_errors=True)
    return str(SHARED / DATASETS[dataset]), run_dir, load_backbone(str(BASE), "cpu", dtype=torch.float32)


def eval_every(args) -> int:
    return max(1, args.steps // (args.curve_points or 4))


def vae_curve_point(trainer: VAETrainer, test: list[str], iw_samples: int) -> dict:
    """The test-set metrics of the model as it is at this step (training resumes in train mode)."""
    metrics = evaluate_vae(trainer.vae, trainer.model, trainer.tokenizer, test, iw_samples,
                           trainer.config.max_length, progress=False)
    trainer.model.train()
    trainer.vae.train()
    return {"step": trainer.step, **{k: metrics[k] for k in CURVE_KEYS}}


def lm_curve_point(trainer: Trainer, test: list[str]) -> dict:
    """The `lm` adapter's exact test PPL at this step (training resumes in train mode)."""
    live = TaskModel(trainer.model, trainer.codec, trainer.backbone.vocab_size, "live")
    metrics = evaluate_lm(live, test)
    trainer.model.train()
    return {"step": trainer.step, "ppl": metrics["ppl"], "nll": metrics["nll"]}


class CurveRecorder:
    """`on_eval` of a curve run: adds the point `measure(trainer)` and saves the row so far (marked partial) at
    once, so a run cut short still reports its curve."""

    def __init__(self, key: str, measure: Callable, args, meta: dict, row: dict):
        self.key, self.measure, self.args, self.meta, self.row = key, measure, args, meta, row
        self.points: list[dict] = []

    def __call__(self, trainer, _result: dict) -> None:
        self.points.append(self.measure(trainer))
        save_row(self.key, {**self.row, "partial": True, "curve": self.points}, self.meta, self.args.long_results,
                 self.args)


def vae_row(dataset: str, recipe: str, args, work: Path, meta: dict) -> dict:
    data, run_dir, backbone = fresh_run(dataset, recipe + variant(args), work)
    c = backbone.model.config
    vae = {"nz": 32, "encoder_layers": round(2 * c.n_layer / 3), "bottleneck": c.n_embd // 6}
    config = VAETrainConfig.for_recipe(recipe, name=f"{dataset}-{recipe}", data=data, base=str(BASE), vae=vae,
                                       batch_size=args.batch_size, max_steps=args.steps,
                                       eval_every=eval_every(args), max_eval_sentences=200, seed=args.seed,
                                       word_dropout=args.word_dropout or None)
    RunDir(run_dir).prepare(config)
    test, train = load_sentences(data, "test")[: args.test_sentences], load_sentences(data, "train")
    iw_samples = args.curve_iw_samples or args.iw_samples
    recorder = CurveRecorder(f"{dataset}/{recipe}{variant(args)}", lambda t: vae_curve_point(t, test, iw_samples),
                             args, meta, {"steps": args.steps, "train_sentences": len(train)})
    trainer = VAETrainer(backbone, config, run_dir, on_eval=recorder if args.curve_points else None)
    started = time.time()
    log = trainer.train(train, load_sentences(data, "validation"))
    seconds = time.time() - started
    export = read_export(run_dir / "best")
    model = load_vae(export.adapter_tensors, export.meta, c)
    metrics = evaluate_vae(model, backbone.model, backbone.tokenizer, test, args.iw_samples, config.max_length)
    return {**metrics, **trainer.parameter_report(), "train_seconds": seconds, "steps": args.steps,
            "train_sentences": len(train), "best_step": log.best_step, "evals": log.evals,
            "phase2_start": log.phase2_start,
            "kl_normalisation": config.kl_normalisation, "kl_floor": config.kl_floor, "kl_floor_per_sentence": True,
            "word_dropout": config.word_dropout, "machine": machine(), "note": args.note,
            **({"curve": recorder.points} if recorder.points else {}),
            **latent_walks(model, backbone, load_sentences(data, "test"), args.seed)}


@torch.no_grad()
def latent_walks(model, backbone, sentences: list[str], seed: int) -> dict:
    """Five interpolation paths between test sentences, five prior samples and one analogy, as text (greedy)."""
    from hub.adapters.vae import encode_sentences, pad_rows

    tokenizer, eos = backbone.tokenizer, backbone.tokenizer.eos_token_id or 0

    def decode(z) -> list[str]:
        return [tokenizer.decode(ids).strip() for ids in model.greedy(backbone.model, z, eos, eos, 30)]

    ids, mask = pad_rows(encode_sentences(tokenizer, sentences[: 2 * SHOWN_PATHS + 1], 32), backbone.device)
    mu, _ = model.encode(backbone.model, ids, mask)
    paths = [{"a": sentences[2 * i], "b": sentences[2 * i + 1],
              "path": decode(interpolation_path(mu[2 * i], mu[2 * i + 1], 5))} for i in range(SHOWN_PATHS)]
    prior = torch.randn(SHOWN_PATHS, mu.shape[1], generator=torch.Generator().manual_seed(seed))
    analogy = {"a": sentences[0], "b": sentences[1], "c": sentences[2],
               "output": decode(analogy_point(mu[0], mu[1], mu[2])[None])[0]}
    return {"interpolations": paths, "prior_samples": decode(prior), "analogy": analogy}


def lm_row(dataset: str, vae_params: int, args, work: Path, meta: dict) -> dict:
    """The `lm` adapter with the bottleneck whose size is nearest the VAE bundle's."""
    data, run_dir, backbone = fresh_run(dataset, "lm", work)
    c = backbone.model.config
    bottleneck = min(range(1, 4 * c.n_embd), key=lambda b: abs(adapter_parameter_count(c.n_layer, c.n_embd, b)
                                                                 + 2 * c.n_embd - vae_params))
    task = make_task("lm")
    config = TrainConfig(name=f"{dataset}-lm", task_type="lm", task_config={}, data=data, bottleneck=bottleneck,
                         lr=1e-3, batch_size=args.batch_size, grad_accum=1, max_length=32, epochs=1,
                         max_steps=args.steps, eval_every=eval_every(args), seed=args.seed, base=str(BASE))
    RunDir(run_dir).prepare(config)
    test = load_sentences(data, "test")[: args.test_sentences]
    recorder = CurveRecorder(f"{dataset}/lm", lambda t: lm_curve_point(t, test), args, meta, {"steps": args.steps})
    trainer = Trainer(backbone, task, config, run_dir, on_eval=recorder if args.curve_points else None)
    started = time.time()
    trainer.train(task.load_examples(data, "train"), task.load_examples(data, "validation")[:200])
    seconds = time.time() - started
    metrics = evaluate_lm(from_run(run_dir, str(BASE), "cpu", make_task), test)
    return {**metrics, "lm_own_vocabulary": True, "trainable_params": trainer.trainable_count,
            "trainable_pct": 100 * trainer.trainable_count / backbone.num_parameters, "bottleneck": bottleneck,
            "train_seconds": seconds, "steps": args.steps, "best_step": trainer.log.best_step,
            **({"curve": recorder.points} if recorder.points else {})}


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save_row(key: str, row: dict, meta: dict, path: Path, args) -> None:
    """Add one row to `path` (the short runs' or the long runs' results) and re-render the doc from both, under a
    lock: data sets may run in parallel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        if "+" not in key or "meta" not in results:  # a variant row keeps the meta of the rows it is compared with
            results["meta"] = meta
        results["rows"][key] = row
        path.write_text(json.dumps(results, indent=1))
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(render_doc(args))


def render_doc(args) -> str:
    return render(load_results(args.results), args.doc, load_results(args.long_results))


def variant(args) -> str:
    """The row-name suffix of a run that changes a recipe's option: `+wd0.3` for word dropout 0.3."""
    return f"+wd{args.word_dropout:g}" if args.word_dropout else ""


def label(name: str) -> str:
    base, _, option = name.partition("+")
    return ROW_LABELS[base] + (f" + word dropout {option[2:]}" if option else "")


def dataset_rows(results: dict, dataset: str) -> dict[str, dict | None]:
    """The data set's rows by name: the four ROWS (None where missing), then variants (`adavae+wd0.3`)."""
    rows = {r: results["rows"].get(f"{dataset}/{r}") for r in ROWS}
    variants = {k.split("/", 1)[1]: v for k, v in results["rows"].items() if k.startswith(f"{dataset}/") and "+" in k}
    return {**rows, **variants}


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(results: dict, doc: Path, long: dict | None = None) -> str:
    """The short runs' tables, plots and samples per data set; then the long runs' curves (`render_long`)."""
    meta = results.get("meta", {})
    lines = ["# Sentence VAE quality on the stand-in GPT-2", "",
             "Generated by `python -m bench.vae_quality` "
             f"({meta.get('steps')} steps of batch {meta.get('batch_size')} per row, test = first "
             f"{meta.get('test_sentences')} test sentences, IW with k = {meta.get('iw_samples')}; machine: "
             f"{meta.get('machine')}; {meta.get('note', '')}).", "",
             "Metrics (spec §5, `hub.evaluation.vae_metrics`): PPL = exp(−Σ log p̂(x) / Σ n_x) with n_x the tokens "
             "of `<bos> x <eos>`; for the `lm` adapter log p(x) is exact, for VAEs it is the importance-weighted "
             "estimate. −ELBO, Rec, KL in nats per sentence; MI over the test set (at most ln N, up to the "
             "estimator's one-sample noise: its aggregate posterior is the mixture of the N test sentences' "
             "posteriors, so ln 100 = 4.61 nats for 100 sentences); AU = dims with Var(μ) ≥ 0.01; "
             "recon BLEU = greedy decoding from z = μ, sacreBLEU against the input.", "",
             f"Budget: {meta.get('steps')} steps × batch {meta.get('batch_size')} = "
             f"{(meta.get('steps') or 0) * (meta.get('batch_size') or 0):,} sentences per row ({epochs_line(meta)}; "
             "AdaVAE's LM runs: 22,000 steps × batch 90); the numbers are those of short runs "
             "on a shared CPU, not of converged models." + (
                 "" if sum("+" not in k for k in results["rows"]) == len(DATASETS) * len(ROWS)
                 else " Rows missing below did not finish before the deadline."), ""]
    if long and long["rows"]:
        lines += ["A longer run's test metrics over training steps, against the `lm` adapter at the same steps, and "
                  "whether the gap closes: *Long runs*, the last section.", ""]
    for dataset in DATASETS:
        rows = dataset_rows(results, dataset)
        if not any(rows.values()):
            continue
        lines += [f"## {dataset} (`../shared/{DATASETS[dataset]}`)", "",
                  "| row | trainable (% of backbone) | PPL (IW) | −ELBO | Rec | KL | MI | AU | recon BLEU | train time |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            if row is None:
                continue
            latent = [None] * 6 if name == "lm" else [row[k] for k in ("neg_elbo", "rec", "kl", "mi", "au",
                                                                            "recon_bleu")]
            lines.append(f"| {label(name)} | {row['trainable_params']:,} ({row['trainable_pct']:.2f} %) | "
                         f"{fmt(row['ppl'])} | " + " | ".join(fmt(v) for v in latent) +
                         f" | {row['train_seconds']:.0f} s |")
        lines += ["", *targets(rows), *readings(rows), *z_use_readings(rows), *lm_vocabulary_note(rows), ""]
        plot = plot_curves(dataset, rows, doc.parent)
        if plot:
            lines += [f"![held-out KL and AU over training, {dataset}]({plot})", ""]
        lines += samples(rows)
    if long and long["rows"]:
        lines += render_long(long, doc.parent)
    return "\n".join(lines) + "\n"


def epochs_line(meta: dict) -> str:
    """Epochs of each data set's training split that the rows' steps × batch make."""
    seen = (meta.get("steps") or 0) * (meta.get("batch_size") or 0)
    sizes = {name: len(load_sentences(str(SHARED / path), "train")) for name, path in DATASETS.items()}
    return ", ".join(f"{seen / size:.1f} epochs of {name}'s {size:,} training sentences"
                     for name, size in sizes.items())


def render_long(long: dict, folder: Path) -> list[str]:
    """Per data set: the VAE's test metrics and the `lm` adapter's PPL at the same steps, a plot, the gap they
    show and the hand-written analysis (`--analysis`)."""
    meta = long.get("meta", {})
    lines = ["## Long runs: the test metrics over training steps", "",
             f"Generated by `python -m bench.vae_quality --steps {meta.get('steps')} --curve-points "
             f"{meta.get('curve_points')}` (batch {meta.get('batch_size')}, first {meta.get('test_sentences')} test "
             f"sentences, IW with k = {meta.get('curve_iw_samples')} at each point and k = {meta.get('iw_samples')} "
             f"for the final best checkpoint; machine: {meta.get('machine')}; {meta.get('note', '')}). Each point "
             "scores the model as it is at that step (not the best checkpoint); the `lm` adapter trains for the same "
             "steps and batch and is scored exactly at the same steps.", ""]
    for dataset in DATASETS:
        rows = dataset_rows(long, dataset)
        lm = rows.pop("lm")
        for name, row in rows.items():
            if row and row.get("curve"):
                lines += long_table(dataset, name, row, lm, meta) + [""]
                lines += [f"![test metrics over steps, {dataset} {name}]({plot_long(dataset, name, row, lm, folder)})",
                          ""]
                lines += [*gap_readings(name, row, lm), *z_use_readings({name: row}), ""]
    lines += [*long.get("analysis", []), ""] if long.get("analysis") else []
    return lines


def lm_at(lm: dict | None, step: int, key: str = "ppl") -> float | None:
    return next((p[key] for p in (lm or {}).get("curve", []) if p["step"] == step), None)


def long_table(dataset: str, name: str, row: dict, lm: dict | None, meta: dict) -> list[str]:
    cut = f", cut short after step {row['curve'][-1]['step']}" if row.get("partial") else ""
    lines = [f"### {dataset}: {label(name)} against the lm adapter, {row['steps']} steps planned{cut}", "",
             "| step | epochs | lm PPL | lm −log p(x) | VAE PPL (IW) | VAE / lm | −ELBO | Rec | KL | MI | AU | "
             "recon BLEU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for point in row["curve"]:
        lm_ppl = lm_at(lm, point["step"])
        ratio = point["ppl"] / lm_ppl if lm_ppl else None
        epochs = point["step"] * meta["batch_size"] / row["train_sentences"]
        lines.append(f"| {point['step']} | {epochs:.1f} | {fmt(lm_ppl)} | {fmt(lm_at(lm, point['step'], 'nll'))} | "
                     f"{fmt(point['ppl'])} | "
                     f"{fmt(ratio)} | " + " | ".join(fmt(point[k]) for k in ("neg_elbo", "rec", "kl", "mi", "au",
                                                                           "recon_bleu")) + " |")
    if row.get("partial"):
        return lines
    lm_ppl = lm["ppl"] if lm and not lm.get("partial") else None
    best = f"| best held-out checkpoint (step {row['best_step']}), k = {row['iw_samples']} | | " \
           f"{fmt(lm_ppl)} | {fmt(lm['nll'] if lm_ppl else None)} | {fmt(row['ppl'])} | {fmt(row['ppl'] / lm_ppl) if lm_ppl else '–'} | " \
           + " | ".join(fmt(row[k]) for k in ("neg_elbo", "rec", "kl", "mi", "au", "recon_bleu")) + " |"
    return lines + [best]


def gap_readings(name: str, row: dict, lm: dict | None) -> list[str]:
    """Whether the PPL gap to the `lm` adapter and the reconstruction change from the first point to the last."""
    first, last = row["curve"][0], row["curve"][-1]
    out = [f"- {label(name)}: reconstruction BLEU {first['recon_bleu']:.2f} at step {first['step']} → "
           f"{last['recon_bleu']:.2f} at step {last['step']} (best {max(p['recon_bleu'] for p in row['curve']):.2f}); "
           f"KL {first['kl']:.1f} → {last['kl']:.1f} nats; MI {first['mi']:.2f} → {last['mi']:.2f} "
           f"({mi_bound(last['mi'], last['sentences'])})"]
    gaps = [(p["step"], p["ppl"] / lm_ppl) for p in row["curve"] if (lm_ppl := lm_at(lm, p["step"]))]
    if gaps:
        narrowest = min(gaps, key=lambda g: g[1])
        out.append(f"- PPL gap VAE / lm: {gaps[0][1]:.2f}× at step {gaps[0][0]}, {gaps[-1][1]:.2f}× at step "
                   f"{gaps[-1][0]}, narrowest {narrowest[1]:.2f}× at step {narrowest[0]}")
    return out


def mi_bound(mi: float, sentences: int) -> str:
    """MI against its ln N bound over N sentences; near the bound the set is too small to measure more."""
    bound = math.log(sentences)
    reading = (": at the bound (beyond it only by the one-sample estimator's noise), so this set of sentences "
               "cannot show more MI" if mi >= 0.9 * bound else "")
    return f"at most ln {sentences} = {bound:.2f} over {sentences} sentences{reading}"


def plot_long(dataset: str, name: str, row: dict, lm: dict | None, folder: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in row["curve"]]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    axes[0, 0].plot(steps, [p["ppl"] for p in row["curve"]], "o-", label=f"{name} (IW)")
    if lm and lm.get("curve"):
        axes[0, 0].plot([p["step"] for p in lm["curve"]], [p["ppl"] for p in lm["curve"]], "s-", label="lm adapter")
    axes[0, 0].set(ylabel="test PPL", yscale="log")
    axes[0, 0].legend()
    for key, ax in (("kl", axes[0, 1]), ("mi", axes[0, 1])):
        ax.plot(steps, [p[key] for p in row["curve"]], "o-", label=key.upper())
    axes[0, 1].set(ylabel="nats")
    axes[0, 1].legend()
    axes[1, 0].plot(steps, [p["au"] for p in row["curve"]], "o-")
    axes[1, 0].set(xlabel="step", ylabel="active units")
    axes[1, 1].plot(steps, [p["recon_bleu"] for p in row["curve"]], "o-")
    axes[1, 1].set(xlabel="step", ylabel="reconstruction BLEU")
    fig.tight_layout()
    file = f"vae_long_{dataset}_{name}.png"
    fig.savefig(folder / file, dpi=90)
    plt.close(fig)
    return file


def targets(rows: dict) -> list[str]:
    """The issue's targets, checked against the measured rows."""
    out, lm = [], rows.get("lm")
    none = rows.get("none")
    if none:
        collapsed = none["kl"] < 1 and none["au"] <= 2
        out.append(f"- (iv) collapse (KL < 1 nat and AU ≤ 2): **{'yes' if collapsed else 'no'}** "
                   f"(KL {none['kl']:.2f}, AU {none['au']})")
    for name in ("adavae", "two-phase"):
        row = rows.get(name)
        if not row:
            continue
        ratio = row["ppl"] / lm["ppl"] if lm else None
        checks = [f"AU ≥ 16: {'met' if row['au'] >= 16 else 'missed'} ({row['au']})",
                  f"MI ≥ 2: {'met' if row['mi'] >= 2 else 'missed'} ({row['mi']:.2f} of at most "
                  f"ln {row['sentences']} = {math.log(row['sentences']):.2f})"]
        if ratio is not None:
            checks.append(f"PPL ≤ 1.05× lm: {'met' if ratio <= 1.05 else 'missed'} ({ratio:.2f}×)")
        out.append(f"- {ROW_LABELS[name]}: " + "; ".join(checks))
    return out


def readings(rows: dict) -> list[str]:
    """What the rows show beyond the targets: KL held at a floor, a decoder that ignores z, time spent."""
    out = []
    for name in ("adavae", "two-phase", "none"):
        row = rows.get(name)
        if not row or "evals" not in row:
            continue
        notes = [floor_reading(name, row)] if floor_reading(name, row) else []
        lm = rows.get("lm")
        if lm and "nll" in lm and "nll" in row:
            notes.append(f"−log p(x) {row['nll']:.1f} nats per sentence against the lm adapter's {lm['nll']:.1f}: "
                         f"reconstruction given z costs {row['rec']:.1f} nats, {abs(lm['nll'] - row['rec']):.1f} "
                         f"{'fewer' if row['rec'] <= lm['nll'] else 'more'} than the lm's −log p(x), while KL costs "
                         f"{row['kl']:.1f}; the PPL reaches the lm's only "
                         f"once what z saves pays for the KL")
        if row["recon_bleu"] < 5:
            notes.append(f"reconstruction BLEU {row['recon_bleu']:.2f}: greedy decoding from μ does not reproduce "
                         f"the input, so the decoder uses z little even where MI is > 0")
        if notes:
            out.append(f"- {ROW_LABELS[name]}: " + "; ".join(notes))
    return out


def floor_reading(recipe: str, row: dict) -> str | None:
    """What the recipe's KL floor does to the KL measured (λ as the recipe sets it)."""
    floor, lam = RECIPES.get(recipe, {}).get("kl_floor"), RECIPES.get(recipe, {}).get("kl_lambda", 0.5)
    total = lam * row["nz"]
    if floor == "total_hinge" and abs(row["kl"] - total) < 1.5:
        return (f"KL {row['kl']:.1f} is at the total hinge λ·nz = {total:.0f} nats, below which the batch's KL gets "
                f"no gradient: the floor, not the data, holds it there")
    if floor in ("per_dim_clamp", "per_dim_mask"):
        earlier = "" if row.get("kl_floor_per_sentence") else (
            " (this row was trained with the floor's earlier batch-mean form, before issue 18, and not re-run)")
        return (f"KL {row['kl']:.1f} against λ·nz = {total:.0f} nats: the per-dimension floor does not hold the "
                f"total at λ·nz; it only stops the KL gradient of each sentence's dimensions below λ = {lam} "
                f"nats{earlier}")
    return None


def plot_curves(dataset: str, rows: dict, folder: Path) -> str | None:
    vae_rows = {name: row for name, row in rows.items() if row and row.get("evals")}
    if not vae_rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, au_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, row in vae_rows.items():
        steps = [e["step"] for e in row["evals"]]
        kl_ax.plot(steps, [e["kl"] for e in row["evals"]], "o-", label=name)
        au_ax.plot(steps, [e["au"] for e in row["evals"]], "o-", label=name)
    kl_ax.set(xlabel="step", ylabel="held-out KL (nats/sentence)", yscale="symlog")
    au_ax.set(xlabel="step", ylabel="held-out active units")
    kl_ax.legend()
    fig.tight_layout()
    name = f"vae_kl_au_{dataset}.png"
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    return name


def samples(rows: dict) -> list[str]:
    out = []
    for name in ("adavae", "two-phase"):
        row = rows.get(name)
        if not row or "interpolations" not in row:
            continue
        out += [f"### {ROW_LABELS[name]}: interpolations (μ(a) → μ(b), 5 points, greedy)", ""]
        for walk in row["interpolations"]:
            out += [f"- a: *{walk['a']}* → b: *{walk['b']}*"] + [f"  {i}. {t}" for i, t in enumerate(walk["path"])]
        out += ["", "Prior samples z ~ N(0, I), greedy: " + " / ".join(f"*{t}*" for t in row["prior_samples"]), "",
                f"Analogy a : b = c : ? with a = *{row['analogy']['a']}*, b = *{row['analogy']['b']}*, "
                f"c = *{row['analogy']['c']}* → *{row['analogy']['output']}*", ""]
        recon = row.get("reconstructions", [])[:3]
        out += ["Reconstructions (input → greedy from μ): " + " / ".join(f"*{a}* → *{b}*" for a, b in recon), ""]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--test-sentences", type=int, default=100)
    parser.add_argument("--iw-samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "vae_quality")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "vae_quality.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "VAE.md")
    parser.add_argument("--word-dropout", type=float, default=0.0,
                        help="decoder word dropout p for the VAE rows (a variant row, e.g. snli/adavae+wd0.3)")
    parser.add_argument("--curve-points", type=int, default=0,
                        help="score each row on the test sentences at this many evenly spaced steps; the rows go "
                             "into --long-results")
    parser.add_argument("--curve-iw-samples", type=int, default=None, help="IW samples at curve points (--iw-samples)")
    parser.add_argument("--long-results", type=Path, default=ROOT / "docs" / "vae_long.json")
    parser.add_argument("--analysis", type=Path, default=None,
                        help="with --render-only: a markdown file whose lines go under the long runs' curves")
    parser.add_argument("--render-only", action="store_true", help="rewrite --doc from the results, run nothing")
    parser.add_argument("--rescore", action="store_true",
                        help="score the rows whose run folders are in --work again (lm PPL, the VAEs' use of z)")
    args = parser.parse_args()
    if args.render_only or args.rescore:
        return rescore(args) if args.rescore else render_only(args)
    torch.set_num_threads(1)
    meta = {"steps": args.steps, "batch_size": args.batch_size, "test_sentences": args.test_sentences,
            "iw_samples": args.iw_samples, "machine": machine(), "note": args.note}
    if args.curve_points:
        meta.update(curve_points=args.curve_points, curve_iw_samples=args.curve_iw_samples or args.iw_samples)
    results_path = args.long_results if args.curve_points else args.results
    for dataset in args.datasets:
        vae_params = None
        for name in [r for r in ROWS if r in args.rows and r != "lm"] + (["lm"] if "lm" in args.rows else []):
            if name == "lm":
                known = vae_params or next((r["trainable_params"] for k, r in load_results(args.results)["rows"].items()
                                            if k.startswith(dataset + "/") and k != f"{dataset}/lm"), None)
                row = lm_row(dataset, known or 0, args, args.work, meta)
            else:
                row = vae_row(dataset, name, args, args.work, meta)
                vae_params = row["trainable_params"]
            save_row(f"{dataset}/{name}{variant(args) if name != 'lm' else ''}", row, meta, results_path, args)
            print(f"{dataset}/{name}: PPL {row['ppl']:.2f}, KL {row.get('kl')}, AU {row.get('au')}", flush=True)

def rescore(args) -> None:
    """Rows whose run folder is in --work, scored again by the current code (the results file of the run:
    --long-results with --curve-points): the `lm` row's PPL (`evaluate_lm`), each VAE row's `decoder_use_of_z`."""
    path = args.long_results if args.curve_points else args.results
    results = load_results(path)
    for key, row in list(results["rows"].items()):
        dataset, name = key.split("/", 1)
        run_dir = args.work / f"{dataset}-{name}"
        if dataset not in args.datasets or not (run_dir / "best").is_dir():
            continue
        test = load_sentences(str(SHARED / DATASETS[dataset]), "test")[: args.test_sentences]
        if name == "lm":
            row.update(evaluate_lm(from_run(run_dir, str(BASE), "cpu", make_task), test), lm_own_vocabulary=True)
        else:
            row["z_use"] = z_use(run_dir / "best", test)
        save_row(key, row, results["meta"], path, args)
        print(f"{key} rescored: PPL {row['ppl']:.2f}" if name == "lm" else f"{key}: {row['z_use']}")


def z_use(export_dir: Path, sentences: list[str]) -> dict[str, float]:
    """`decoder_use_of_z` of an exported VAE on the stand-in."""
    backbone = load_backbone(str(BASE), "cpu", dtype=torch.float32)
    export = read_export(export_dir)
    model = load_vae(export.adapter_tensors, export.meta, backbone.model.config)
    return decoder_use_of_z(model, backbone.model, backbone.tokenizer, sentences)


def z_use_readings(rows: dict) -> list[str]:
    """Rows measured by `decoder_use_of_z` (`--rescore`): what the decoder gains from the sentence's own code."""
    out = []
    for name, row in rows.items():
        use = (row or {}).get("z_use")
        if use:
            out.append(f"- {label(name)}, decoder's use of z (test Rec, nats per sentence, z not sampled): "
                       f"{use['rec_own_mu']:.2f} with the sentence's own μ, {use['rec_other_mu']:.2f} with the next "
                       f"sentence's μ, {use['rec_zero_z']:.2f} with z = 0: its own code saves "
                       f"{use['rec_other_mu'] - use['rec_own_mu']:.2f} nats over another sentence's")
    return out


def lm_vocabulary_note(rows: dict) -> list[str]:
    """Rows whose `lm` PPL was scored before `evaluate_lm` kept the softmax to the task's own rows."""
    lm = rows.get("lm")
    if not lm or lm.get("lm_own_vocabulary") or lm.get("partial"):
        return []
    return ["- (i) lm adapter: its PPL was scored before issue 18 fixed `evaluate_lm` on the serving engine, whose "
            "softmax then also spread over the engine table's 64 task rows of other slots: about 2 % too high (a "
            "smoke run: 169.0 against 165.5 with the task's own rows only), so the VAE / lm ratios here are about "
            "2 % too low. Its run folder is gone; `--rescore` refreshes a row whose folder is in --work."]


def render_only(args) -> None:
    """Rewrite --doc; with --analysis, store that file's lines in the long results first."""
    if args.analysis:
        long = load_results(args.long_results)
        long["analysis"] = args.analysis.read_text().splitlines()
        args.long_results.write_text(json.dumps(long, indent=1))
    args.doc.write_text(render_doc(args))


if __name__ == "__main__":
    main()
