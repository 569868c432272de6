"""MVCR on low-resource subsets: the VLM adapter with and without MVCR (and full fine-tuning ± MVCR at N = 500).

Every cell trains with the hub's `Trainer` on N training examples (`--train-examples N --data-seed S`, the
subset and the run's seed both S) for the same number of steps, evaluates held-out loss every `--eval-every`
steps, keeps the best checkpoint, and decodes the first `--limit` unique test inputs greedily with `hub eval`'s
code. Each cell runs in its own process (one torch thread; its peak RSS is the cell's peak memory), `--workers`
at a time, in priority order; each finished cell is added to `--results` under a lock and `docs/MVCR.md` (with
the held-out loss curves beside it) is regenerated, so a partial run still renders.

    python -m bench.mvcr                                   # every cell
    python -m bench.mvcr --steps 4 --limit 5 --only e2e-adapter-n100 --results /tmp/m/mvcr.json \\
        --doc /tmp/m/MVCR.md --work /tmp/m/runs            # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.common import SHARED, STALE, machine, nist_is_stale, stale_nist_note

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (1, 2, 3)


@dataclass(frozen=True)
class Setting:
    task: str
    data: str  # relative to the shared folder
    options: dict = field(default_factory=dict)
    keys: tuple[str, ...] = ()  # metric keys to report, in order
    scale: float = 1.0  # scores are reported × this


TASKS = {
    "e2e": Setting("e2e", "data/e2e/original", keys=("bleu", "nist", "meteor", "rouge_l", "cider")),
    "translate": Setting("translate", "data/multi30k", {"source_lang": "en", "target_lang": "de"}, keys=("score",)),
}
SCALED = {"meteor", "rouge_l"}  # fractions, reported × 100 as papers do (BLEU is already 0-100)
METRIC_NAMES = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr",
                "score": "sacreBLEU"}


@dataclass(frozen=True)
class Cell:
    task: str
    n: int
    method: str
    mvcr: bool
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.method}{'-mvcr' if self.mvcr else ''}-n{self.n}-s{self.seed}"

    @property
    def group(self) -> str:
        return f"{self.task}-{self.method}-n{self.n}"


def cells() -> list[Cell]:
    """Priority order: the target comparison (E2E adapter at N = 500), then the other groups seed by seed, so that
    a cut-short run still has a paired seed of each."""
    target = [("e2e", 500, "adapter")]
    others = [("e2e", 500, "full"), ("translate", 500, "adapter"), ("e2e", 100, "adapter"), ("e2e", 1000, "adapter"),
              ("translate", 100, "adapter"), ("translate", 1000, "adapter")]

    def pairs(groups, seeds) -> list[Cell]:
        return [Cell(task, n, method, mvcr, seed) for seed in seeds for task, n, method in groups
                for mvcr in (False, True)]

    return pairs(target, SEEDS) + pairs(others[:3], SEEDS) + pairs(others[3:], SEEDS)


# -- one cell (in its own process) ----------------------------------------------------------------------------

def run_cell(cell: Cell, args: argparse.Namespace) -> dict:
    import torch

    from bench.quality import mr_coverage
    from hub.evaluation.decode import Decoding, evaluate, from_run, write_result
    from hub.evaluation.metrics.e2e.mteval import NIST_RULE
    from hub.model.backbone import load_backbone
    from hub.training.baselines import default_lr, load_baseline, make_trainer
    from hub.training.run_dir import RunDir
    from hub.training.trainer import TrainConfig
    from tasks import make_task

    torch.set_num_threads(1)
    setting = TASKS[cell.task]
    task = make_task(setting.task, setting.options)
    data = str(args.shared / setting.data)
    train, held_out = task.load_examples(data, "train"), task.load_examples(data, "validation")
    backbone = load_backbone(args.base, "cpu", dtype=torch.float32)
    d = task.defaults
    config = TrainConfig(
        name=cell.task, task_type=cell.task, task_config=task.config(), data=data, bottleneck=d.bottleneck,
        lr=default_lr(task, cell.method), batch_size=args.batch_size, grad_accum=1,
        max_length=min(d.max_length, backbone.n_positions), epochs=1, max_steps=args.steps,
        eval_every=args.eval_every, seed=cell.seed, base=args.base, method=cell.method,
        train_examples=cell.n, data_seed=cell.seed, regularizers={"mvcr": {}} if cell.mvcr else {})
    run_dir = args.work / cell.name
    shutil.rmtree(run_dir, ignore_errors=True)
    RunDir(run_dir).prepare(config)
    trainer = make_trainer(backbone, task, config, run_dir)
    eval_seconds = timed(trainer, "evaluate")
    warm_up_seconds = [timed(r, "warm_up") for r in trainer.regularizers]
    started = time.time()
    log = trainer.train(train, held_out[: args.held_out])
    train_seconds = time.time() - started
    task_model = (from_run(run_dir, args.base, "cpu", make_task) if cell.method == "adapter"
                  else load_baseline(run_dir, args.base, "cpu", make_task))
    result = evaluate(task_model, str(args.shared / setting.data), "test",
                      Decoding(max_new_tokens=d.max_new_tokens, batch_size=32), args.limit, progress=False)
    write_result(result, run_dir / "eval")
    return {
        **asdict(cell), "cell": cell.name, "steps": trainer.step, "best_step": log.best_step,
        "best_eval_loss": log.best_eval_loss, "mvcr_settings": config.regularizers.get("mvcr"),
        "warm_up_seconds": sum(w[0] for w in warm_up_seconds),
        "step_seconds": (train_seconds - eval_seconds[0] - sum(w[0] for w in warm_up_seconds)) / max(1, trainer.step),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "evals": [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in log.evals],
        "test": result.record(),
        **({**mr_coverage(result.sources, result.outputs), "nist_rule": NIST_RULE} if cell.task == "e2e" else {}),
        "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def interleaved_step_times(args: argparse.Namespace, rounds: int = 8) -> dict:
    """Training-step seconds with and without MVCR, measured alternately in one process on the same batches
    (E2E adapter, N = 500), so that a shared machine's changing load falls on both alike."""
    import random

    import torch

    from hub.model.backbone import load_backbone
    from hub.training.trainer import Trainer, TrainConfig
    from tasks import make_task

    torch.set_num_threads(1)
    setting = TASKS["e2e"]
    task = make_task(setting.task)
    backbone = load_backbone(args.base, "cpu", dtype=torch.float32)
    config = TrainConfig(name="e2e", task_type="e2e", task_config={}, data="", bottleneck=task.defaults.bottleneck,
                         lr=task.defaults.lr, batch_size=args.batch_size, grad_accum=1, max_length=512, epochs=1,
                         train_examples=500, regularizers={"mvcr": {}})
    trainer = Trainer(backbone, task, config, args.work / "timing")
    train_set = trainer.training_set(task.load_examples(str(args.shared / setting.data), "train"))
    optimization = trainer.optimization(2 * rounds)
    mvcr = trainer.regularizers[0]
    rng = random.Random(0)
    trainer.model.train()
    seconds = {False: [], True: []}
    for _ in range(rounds):
        batch = rng.sample(train_set, args.batch_size)
        for with_mvcr in (False, True):
            started = time.time()
            with mvcr.attached(trainer.model) if with_mvcr else contextlib.nullcontext():
                trainer.train_step([batch], optimization)
            seconds[with_mvcr].append(time.time() - started)
    plain, with_mvcr = statistics.median(seconds[False]), statistics.median(seconds[True])
    return {"rounds": rounds, "batch_size": args.batch_size, "plain_median_s": plain, "mvcr_median_s": with_mvcr, "ratio": with_mvcr / plain,
            "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def timed(obj, method: str) -> list[float]:
    """Wrap `obj.method` so its total wall time accumulates in the returned one-element list."""
    total, original = [0.0], getattr(obj, method)

    def wrapper(*a, **k):
        started = time.time()
        try:
            return original(*a, **k)
        finally:
            total[0] += time.time() - started

    setattr(obj, method, wrapper)
    return total


# -- report ---------------------------------------------------------------------------------------------------

def scores_of(row: dict) -> dict[str, float]:
    scores = row["test"]["scores"]
    return {k: scores[k] * (100 if k in SCALED else 1) for k in TASKS[row["task"]].keys if k in scores}


def stale_mark(runs: list[dict], key: str) -> str:
    """`STALE` after a NIST cell when any of its E2E runs was scored by an earlier NIST rule."""
    return f" {STALE}" if key == "nist" and any(r["task"] == "e2e" and nist_is_stale(r) for r in runs) else ""


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def group_table(rows: list[dict], task: str) -> list[str]:
    """One line per (method, N, ±MVCR) with mean ± std over seeds, and one per paired difference."""
    keys = [k for k in TASKS[task].keys]
    header = " | ".join(METRIC_NAMES[k] for k in keys)
    lines = [f"| method | N | MVCR | seeds | {header} | best held-out loss | step (s) | MVCR warm-up (s) "
             "| peak RSS (MiB) |", "|---|---|---|---|" + "---|" * len(keys) + "---|---|---|---|"]
    groups = sorted({(r["method"], r["n"]) for r in rows if r["task"] == task}, key=lambda g: (g[0] != "adapter", g[1]))
    for method, n in groups:
        by_mvcr = {m: {r["seed"]: r for r in rows if (r["task"], r["method"], r["n"], r["mvcr"]) ==
                       (task, method, n, m)} for m in (False, True)}
        for mvcr, runs in by_mvcr.items():
            if not runs:
                continue
            runs_list = list(runs.values())
            cells_ = " | ".join(mean_std([scores_of(r).get(k) for r in runs_list if k in scores_of(r)]) +
                                stale_mark(runs_list, k) for k in keys)
            lines.append(f"| {method} | {n} | {'yes' if mvcr else 'no'} | {len(runs)} | {cells_} | "
                         f"{mean_std([r['best_eval_loss'] for r in runs_list])} | "
                         f"{statistics.mean(r['step_seconds'] for r in runs_list):.2f} | "
                         f"{statistics.mean(r.get('warm_up_seconds', 0) for r in runs_list):.0f} | "
                         f"{max(r['peak_rss_mib'] for r in runs_list):.0f} |")
        paired = sorted(set(by_mvcr[False]) & set(by_mvcr[True]))
        if paired:
            diffs = " | ".join(mean_std([scores_of(by_mvcr[True][s]).get(k, 0) - scores_of(by_mvcr[False][s]).get(k, 0)
                                         for s in paired]) + stale_mark([*runs_list, *by_mvcr[False].values()], k)
                               for k in keys)
            loss = mean_std([by_mvcr[True][s]["best_eval_loss"] - by_mvcr[False][s]["best_eval_loss"] for s in paired])
            ratio = statistics.mean(by_mvcr[True][s]["step_seconds"] / by_mvcr[False][s]["step_seconds"] for s in paired)
            lines.append(f"| **MVCR − plain** | {n} | paired | {len(paired)} | {diffs} | {loss} | ×{ratio:.2f} | | |")
    return lines


def target_check(rows: list[dict]) -> list[str]:
    """The issue's target: adapter + MVCR >= +1 BLEU over the plain adapter at N = 500, mean of 3 seeds."""
    pairs = {}
    for r in rows:
        if (r["task"], r["method"], r["n"]) == ("e2e", "adapter", 500):
            pairs.setdefault(r["seed"], {})[r["mvcr"]] = scores_of(r)["bleu"]
    diffs = [p[True] - p[False] for p in pairs.values() if len(p) == 2]
    if not diffs:
        return ["**Target** (adapter + MVCR ≥ +1 BLEU at N = 500, E2E, 3 seeds): not measured yet.", ""]
    mean = statistics.mean(diffs)
    return [f"**Target** (adapter + MVCR ≥ +1 BLEU over the plain adapter at N = 500, E2E, mean of 3 seeds): "
            f"{'met' if mean >= 1 and len(diffs) >= 3 else 'not met'}: MVCR − plain = {mean:+.2f} BLEU over "
            f"{len(diffs)} paired seed(s) ({', '.join(f'{d:+.2f}' for d in diffs)}).", ""]


def timing_line(timing: dict | None) -> list[str]:
    if not timing:
        return ["**Step time ± MVCR**: not measured yet (`python -m bench.mvcr --timing`).", ""]
    return [f"**Step time ± MVCR** (`--timing`: E2E adapter, N = 500, batch {timing['batch_size']}, {timing['rounds']} "
            "rounds alternating a plain and an MVCR training step on the same batch in one process, medians): "
            f"{timing['plain_median_s']:.2f} s plain, {timing['mvcr_median_s']:.2f} s with MVCR, "
            f"**×{timing['ratio']:.2f}** (the reconstruction step included; the warm-up is a separate one-off cost, "
            "column *MVCR warm-up*). The per-cell step times in the tables were measured at different times of a "
            "changing load and are not comparable with each other.", ""]


def reading(rows: list[dict], longer: bool) -> list[str]:
    """What the finished cells can and cannot say: MVCR regularises against over-fitting, so it matters whether
    the plain runs got that far (`longer`: a longer-budget section follows)."""
    if not rows:
        return []
    at_last = sum(r["best_step"] == r["steps"] for r in rows)
    by_key = {(r["task"], r["method"], r["n"], r["seed"], r["mvcr"]): r["best_eval_loss"] for r in rows}
    pairs = [(loss, by_key[key[:4] + (False,)]) for key, loss in by_key.items() if key[4] and key[:4] + (False,) in by_key]
    worse = sum(mvcr > plain for mvcr, plain in pairs)
    return ["## Reading the results", "",
            f"In {at_last} of {len(rows)} finished cells the best held-out loss came at the **last** step: at this "
            "step budget (set by the shared 2-core machine) the adapters are still under-fitting, not over-fitting. "
            "That is the regime in which a regulariser has nothing to correct and costs capacity: MVCR's best "
            f"held-out loss is higher than the plain run's in {worse} of {len(pairs)} paired cells (curves above), "
            "and the paired differences in the tables are what this budget measures. " + (
                "The section after the tables trains N = 100 four times longer, until the plain adapter's "
                "held-out loss flattens."
                if longer else "Whether MVCR helps a frozen-backbone adapter once the plain adapter over-fits "
                "(longer training at small N, the MVCR paper's 100-epoch setting) is not measured here; "
                "`python -m bench.mvcr --steps S` re-runs the cells with another budget."), ""]


def render(results: dict, curves: Path, args: argparse.Namespace) -> str:
    rows = list(results["rows"].values())
    planned = {c.name for c in cells()}
    missing = sorted(planned - set(results["rows"]))
    lines = [
        "# MVCR on low-resource subsets (frozen-backbone adapters)", "",
        "Generated by `python -m bench.mvcr` (see its docstring). Backbone `gpt2-standin` (6 layers, d = 256). "
        f"Every cell: N training examples (`--train-examples N --data-seed S`), {results['steps']} optimiser steps "
        f"of batch {results['batch_size']} (the same for every row), held-out loss every {results['eval_every']} "
        "steps on the first "
        f"{results['held_out']} held-out examples, the best checkpoint decoded greedily on the first "
        f"{results['limit']} unique test inputs. Seeds 1, 2, 3 (the run seed and the data seed together); "
        "mean ± sample std over seeds; the paired difference is MVCR − plain per seed. MVCR at its defaults "
        "(`hub train --mvcr`): blocks 3, 4, 5 (MVCR's 6, 8, 11 of 12), HAE dims 43, 85, 171 (128, 256, 512 × "
        "256/768), noise 0.002, 4 warm-up epochs, HAE lr 1e-3.", "",
        f"Machine: {'; '.join(sorted({r['machine'] for r in rows})) or '–'}; 2 cores **shared with other jobs** "
        "while this ran, so step times are noisy: compare the ratio of paired cells, not absolute values. Peak "
        "RSS is the whole cell process (data, model, decoding).", "",
    ]
    rescored = sum("rescored" in r for r in rows)
    if rescored:
        lines += [f"{rescored} E2E cells decoded in an earlier session were scored again from their saved outputs "
                  "with the E2E metric of that time (BLEU on 0-100), so every row's BLEU is on one scale.", ""]
    lines += target_check(rows) + timing_line(results.get("timing"))
    for task in TASKS:
        lines += [f"## {task}", ""] + group_table(rows, task) + [""]
    lines += stale_nist_note([r for r in rows if r["task"] == "e2e"], "`python -m bench.mvcr --only CELL`")
    notes = sorted({n for r in rows for n in r["test"]["notes"]})
    lines += [f"Note: {n}" for n in notes]
    longer = bool(args.long_results and args.long_results.exists())
    lines += ["", f"![held-out loss, plain vs MVCR]({curves.name})", ""] + reading(rows, longer)
    if missing:
        lines += [f"**Not run (time ran out): {len(missing)} of {len(planned)} cells:** {', '.join(missing)}.", ""]
    if longer:
        lines += long_budget_section(json.loads(args.long_results.read_text()), curves.with_name("mvcr_curves_long.png"))
    return "\n".join(lines + IMPLEMENTATION) + "\n"


def long_budget_section(results: dict, curves: Path) -> list[str]:
    """The same cells trained long enough for the plain adapter to over-fit: MVCR's own regime."""
    rows = list(results["rows"].values())
    plot_curves(results, curves)

    def best(mvcr: bool) -> list:
        return [r["best_step"] for r in rows if r["mvcr"] == mvcr]

    groups = sorted({(r["task"], r["method"], r["n"]) for r in rows})
    epochs = results["steps"] * results["batch_size"] // max(r["n"] for r in rows)
    return [f"## A longer budget: {results['steps']} steps ({epochs} epochs)", "",
            f"`python -m bench.mvcr --steps {results['steps']} --eval-every {results['eval_every']} --limit "
            f"{results['limit']} --only ...` for {', '.join(f'{t} {m} N = {n}' for t, m, n in groups)}: "
            f"{epochs} passes over the data, towards the over-fitting regime MVCR is for (the paper trains 100 "
            f"epochs). Best held-out step, plain: {', '.join(map(str, best(False)))}; with MVCR: "
            f"{', '.join(map(str, best(True)))} (of {results['steps']}); each decoded from its best checkpoint "
            f"on the first {results['limit']} unique test MRs.", ""] + \
        [line for task in sorted({t for t, _, _ in groups}) for line in group_table(rows, task)] + \
        [""] + stale_nist_note([r for r in rows if r["task"] == "e2e"],
                               "`python -m bench.mvcr --steps ... --only CELL`") + [""] + \
        paired_summary(rows) + \
        ["", f"![held-out loss over {results['steps']} steps, plain vs MVCR]({curves.name})", ""]


def paired_summary(rows: list[dict]) -> list[str]:
    """MVCR − plain per seed on BLEU and the best held-out loss, against the spread over seeds."""
    by_seed: dict[int, dict[bool, dict]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["mvcr"]] = r
    pairs = [p for p in by_seed.values() if len(p) == 2]
    if len(pairs) < 2:
        return []
    bleu = [scores_of(p[True])["bleu"] - scores_of(p[False])["bleu"] for p in pairs]
    loss = [p[True]["best_eval_loss"] - p[False]["best_eval_loss"] for p in pairs]
    separated = abs(statistics.mean(bleu)) > statistics.stdev(bleu)
    return [f"Paired over {len(pairs)} seeds, MVCR − plain: BLEU {mean_std(bleu)} (per seed "
            f"{', '.join(f'{d:+.2f}' for d in bleu)}), best held-out loss {mean_std(loss)}. "
            + ("The mean difference is larger than its spread over seeds." if separated else
               "MVCR is ahead on average once training runs longer, but by less than the spread over seeds: "
               "three seeds do not separate it from noise.")]


IMPLEMENTATION = [
    "## How MVCR is built into the hub", "",
    "- `hub/training/regularizers/__init__.py`: the `Regularizer` interface the trainer knows (hooks for the "
    "duration of `Trainer.train`, extra parameters for the task optimiser, a warm-up, a step after each task "
    "step, checkpoint state); `mvcr.py` is one implementation. The trainer has no MVCR-specific code.",
    "- Hooks: a forward hook on `transformer.h[i].mlp` (GPT-2's MLP output, after its dropout, before the residual "
    "add) per chosen block, registered with handles and removed in a `finally` when training ends. In eval mode "
    "(held-out loss) the hook returns the activation unchanged.",
    "- The autoencoders are never registered in the model: checkpoints keep them apart (to resume), and the export "
    "(`best/`) has exactly the files, keys and shapes of a run without MVCR; `hub.json`'s `training.regularizers` "
    "records `{layers, dims, noise, p_identity, pretrain_epochs, ae_lr}`. `hub/serving/` has no MVCR code.",
    "- Reconstruction: after each task step, each layer's loss mean_k MSE(h, HAE_k(h)) on that step's noisy MLP "
    "outputs, stepped by the layer's own AdamW (HAEs only, lr 1e-3, linear decay over warm-up + task steps, clip "
    "1.0). The public code back-propagates that loss from the task forward; the hub recomputes it from stored, "
    "detached inputs, an unbiased surrogate: the new forward pass draws its own sub-autoencoder and dropout masks, "
    "so the HAEs get a gradient of the same expected loss, not the same gradient (no test compares the two). It "
    "leaves every other parameter untouched (tested: `test_reconstruction_step_touches_only_the_autoencoders`).",
    "- Warm-up: one eval-mode forward pass over the training set captures the MLP outputs (cached while under "
    "512 MiB), then `pretrain_epochs` epochs of reconstruction steps on them plus the noise.",
]


def plot_curves(results: dict, path: Path) -> None:
    """Mean held-out loss vs step, plain (solid) vs MVCR (dashed), one colour per task/method/N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results["rows"].values())
    groups = sorted({(r["task"], r["method"], r["n"]) for r in rows})
    tasks = [task for task in TASKS if any(g[0] == task for g in groups)]  # a panel per task that has rows
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    axes = axes[0]
    for i, (task, method, n) in enumerate(groups):
        ax = axes[tasks.index(task)]
        for mvcr, style in ((False, "-"), (True, "--")):
            runs = [r for r in rows if (r["task"], r["method"], r["n"], r["mvcr"]) == (task, method, n, mvcr)]
            if runs:
                steps = [e["step"] for e in runs[0]["evals"]]
                mean = [statistics.mean(r["evals"][j]["eval_loss"] for r in runs if len(r["evals"]) > j)
                        for j in range(len(steps))]
                ax.plot(steps, mean, style, color=f"C{i}", marker="o", ms=3,
                        label=f"{method} N={n}{' +MVCR' if mvcr else ''} ({len(runs)} seeds)")
    for ax, task in zip(axes, tasks):
        ax.set_title(f"{task}: mean held-out loss")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("nats/token")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(row: dict, args: argparse.Namespace) -> None:
    """Add one cell (if any) to the JSON under a lock, then regenerate the markdown and the curves."""
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(args.results.read_text()) if args.results.exists() else {"rows": {}}
        if row is not None and "timing" in row:
            results["timing"] = row["timing"]
        elif row is not None:
            results.update({k: getattr(args, k) for k in ("steps", "batch_size", "eval_every", "held_out", "limit")})
            results["rows"][row["cell"]] = row
        args.results.write_text(json.dumps(results, indent=1))
        curves = args.doc.with_name("mvcr_curves.png")
        plot_curves(results, curves)
        args.doc.write_text(render(results, curves, args))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=str(SHARED / "models" / "gpt2-standin"))
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--only", action="append", help="run this cell name, or every cell starting with it")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--held-out", type=int, default=200, help="held-out examples for the loss")
    parser.add_argument("--limit", type=int, default=200, help="unique test inputs decoded")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--render", action="store_true", help="only regenerate the markdown and curves")
    parser.add_argument("--timing", action="store_true", help="only measure step times ± MVCR, interleaved")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell in this process
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "mvcr.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "MVCR.md")
    parser.add_argument("--long-results", type=Path, default=ROOT / "docs" / "mvcr_long.json",
                        help="results of a longer budget (--steps) run, rendered as its own section when present")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "mvcr")
    args = parser.parse_args(argv)
    args.device = "cpu"
    return args


def main() -> None:
    args = parse_args()
    by_name = {c.name: c for c in cells()}
    if args.cell:
        return save(run_cell(by_name[args.cell], args), args)
    if args.render:
        return save(None, args)
    if args.timing:
        return save({"timing": interleaved_step_times(args)}, args)
    chosen = [c for c in by_name if not args.only or any(c.startswith(o) for o in args.only)]

    def run(name: str) -> None:
        code = subprocess.call([sys.executable, "-m", "bench.mvcr", *sys.argv[1:], "--cell", name])
        print(f"{name}: {'done' if code == 0 else f'failed ({code})'}", flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(run, chosen))


if __name__ == "__main__":
    main()
