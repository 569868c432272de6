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
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import time
from pathlib import Path

import torch

from bench.common import SHARED, machine
from hub.adapters.vae import analogy_point, interpolation_path, load_vae
from hub.adapters.vlm import adapter_parameter_count
from hub.data import load_sentences
from hub.evaluation.decode import from_run
from hub.evaluation.vae_metrics import evaluate_lm, evaluate_vae
from hub.model.backbone import load_backbone
from hub.store.export import read_export
from hub.training.trainer import TrainConfig, Trainer, prepare_run_dir
from hub.training.vae import VAETrainConfig, VAETrainer, prepare_vae_run_dir
from tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
BASE = SHARED / "models" / "gpt2-standin"
DATASETS = {"snli": "data/snli_sentences", "ptb": "data/ptb", "yelp": "data/vae_text/yelp_yahoo_text_autoencoders/yelp"}
ROWS = ("lm", "adavae", "two-phase", "none")
ROW_LABELS = {"lm": "(i) lm adapter", "adavae": "(ii) --recipe adavae", "two-phase": "(iii) --recipe two-phase",
              "none": "(iv) no remedy (β = 1, no floor)"}
SHOWN_PATHS = 5


def fresh_run(dataset: str, row: str, work: Path):
    """The data path, an emptied run directory and a freshly loaded stand-in for one row."""
    run_dir = work / f"{dataset}-{row}"
    shutil.rmtree(run_dir, ignore_errors=True)
    return str(SHARED / DATASETS[dataset]), run_dir, load_backbone(str(BASE), "cpu", dtype=torch.float32)


def vae_row(dataset: str, recipe: str, args, work: Path) -> dict:
    data, run_dir, backbone = fresh_run(dataset, recipe, work)
    c = backbone.model.config
    vae = {"nz": 32, "encoder_layers": round(2 * c.n_layer / 3), "bottleneck": c.n_embd // 6}
    config = VAETrainConfig.for_recipe(recipe, name=f"{dataset}-{recipe}", data=data, base=str(BASE), vae=vae,
                                       batch_size=args.batch_size, max_steps=args.steps,
                                       eval_every=max(1, args.steps // 4), max_eval_sentences=200, seed=args.seed)
    prepare_vae_run_dir(run_dir, config)
    trainer = VAETrainer(backbone, config, run_dir)
    started = time.time()
    log = trainer.train(load_sentences(data, "train"), load_sentences(data, "validation"))
    seconds = time.time() - started
    export = read_export(run_dir / "best")
    model = load_vae(export.adapter_tensors, export.meta, c)
    test = load_sentences(data, "test")[: args.test_sentences]
    metrics = evaluate_vae(model, backbone.model, backbone.tokenizer, test, args.iw_samples, config.max_length)
    return {**metrics, **trainer.parameter_report(), "train_seconds": seconds, "steps": args.steps,
            "best_step": log.best_step, "evals": log.evals, "phase2_start": log.phase2_start,
            "kl_normalisation": config.kl_normalisation,
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


def lm_row(dataset: str, vae_params: int, args, work: Path) -> dict:
    """The `lm` adapter with the bottleneck whose size is nearest the VAE bundle's."""
    data, run_dir, backbone = fresh_run(dataset, "lm", work)
    c = backbone.model.config
    bottleneck = min(range(1, 4 * c.n_embd), key=lambda b: abs(adapter_parameter_count(c.n_layer, c.n_embd, b)
                                                                 + 2 * c.n_embd - vae_params))
    task = make_task("lm")
    config = TrainConfig(name=f"{dataset}-lm", task_type="lm", task_config={}, data=data, bottleneck=bottleneck,
                         lr=1e-3, batch_size=args.batch_size, grad_accum=1, max_length=32, epochs=1,
                         max_steps=args.steps, eval_every=max(1, args.steps // 4), seed=args.seed, base=str(BASE))
    prepare_run_dir(run_dir, config)
    trainer = Trainer(backbone, task, config, run_dir)
    started = time.time()
    trainer.train(task.load_examples(data, "train"), task.load_examples(data, "validation")[:200])
    seconds = time.time() - started
    metrics = evaluate_lm(from_run(run_dir, str(BASE), "cpu", make_task), load_sentences(data, "test")[: args.test_sentences])
    return {**metrics, "trainable_params": trainer.trainable_count,
            "trainable_pct": 100 * trainer.trainable_count / backbone.num_parameters, "bottleneck": bottleneck,
            "train_seconds": seconds, "steps": args.steps}


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save_row(key: str, row: dict, meta: dict, path: Path, doc: Path) -> None:
    """Add one row to the results file and re-render the doc, under a lock: data sets may run in parallel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        results["meta"] = meta
        results["rows"][key] = row
        path.write_text(json.dumps(results, indent=1))
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render(results, doc))


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(results: dict, doc: Path) -> str:
    meta = results.get("meta", {})
    lines = ["# Sentence VAE quality on the stand-in GPT-2", "",
             "Generated by `python -m bench.vae_quality` "
             f"({meta.get('steps')} steps of batch {meta.get('batch_size')} per row, test = first "
             f"{meta.get('test_sentences')} test sentences, IW with k = {meta.get('iw_samples')}; machine: "
             f"{meta.get('machine')}; {meta.get('note', '')}).", "",
             "Metrics (spec §5, `hub.evaluation.vae_metrics`): PPL = exp(−Σ log p̂(x) / Σ n_x) with n_x the tokens "
             "of `<bos> x <eos>`; for the `lm` adapter log p(x) is exact, for VAEs it is the importance-weighted "
             "estimate. −ELBO, Rec, KL in nats per sentence; MI over the test set; AU = dims with Var(μ) ≥ 0.01; "
             "recon BLEU = greedy decoding from z = μ, sacreBLEU against the input.", "",
             f"Budget: {meta.get('steps')} steps × batch {meta.get('batch_size')} = "
             f"{(meta.get('steps') or 0) * (meta.get('batch_size') or 0):,} sentences per row, under one epoch of "
             "every data set here (AdaVAE's LM runs: 22,000 steps × batch 90); the numbers are those of short runs "
             "on a shared CPU, not of converged models." + (
                 "" if len(results["rows"]) == len(DATASETS) * len(ROWS)
                 else " Rows missing below did not finish before the deadline."), ""]
    for dataset in DATASETS:
        rows = {r: results["rows"].get(f"{dataset}/{r}") for r in ROWS}
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
            lines.append(f"| {ROW_LABELS[name]} | {row['trainable_params']:,} ({row['trainable_pct']:.2f} %) | "
                         f"{fmt(row['ppl'])} | " + " | ".join(fmt(v) for v in latent) +
                         f" | {row['train_seconds']:.0f} s |")
        lines += ["", *targets(rows), *readings(rows), ""]
        plot = plot_curves(dataset, rows, doc.parent)
        if plot:
            lines += [f"![held-out KL and AU over training, {dataset}]({plot})", ""]
        lines += samples(rows)
    return "\n".join(lines) + "\n"


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
                  f"MI ≥ 2: {'met' if row['mi'] >= 2 else 'missed'} ({row['mi']:.2f})"]
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
        floor = {"adavae": 0.5 * row["nz"], "two-phase": 0.5 * row["nz"]}.get(name)
        notes = []
        if floor is not None and abs(row["kl"] - floor) < 1.5:
            notes.append(f"KL {row['kl']:.1f} sits at the floor's {floor:.0f} nats (λ·nz): the floor, not the "
                         f"data, sets it")
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
    parser.add_argument("--render-only", action="store_true", help="rewrite --doc from --results, run nothing")
    args = parser.parse_args()
    if args.render_only:
        args.doc.write_text(render(load_results(args.results), args.doc))
        return
    torch.set_num_threads(1)
    meta = {"steps": args.steps, "batch_size": args.batch_size, "test_sentences": args.test_sentences,
            "iw_samples": args.iw_samples, "machine": machine(), "note": args.note}
    for dataset in args.datasets:
        vae_params = None
        for name in [r for r in ROWS if r in args.rows and r != "lm"] + (["lm"] if "lm" in args.rows else []):
            if name == "lm":
                known = vae_params or next((r["trainable_params"] for k, r in load_results(args.results)["rows"].items()
                                            if k.startswith(dataset + "/") and k != f"{dataset}/lm"), None)
                row = lm_row(dataset, known or 0, args, args.work)
            else:
                row = vae_row(dataset, name, args, args.work)
                vae_params = row["trainable_params"]
            save_row(f"{dataset}/{name}", row, meta, args.results, args.doc)
            print(f"{dataset}/{name}: PPL {row['ppl']:.2f}, KL {row.get('kl')}, AU {row.get('au')}", flush=True)

if __name__ == "__main__":
    main()
