"""Pictures of what was measured: training curves from `train_log.json`, a bar chart of evaluation metrics.

All draw with matplotlib's Agg backend (no display) and return PNG bytes or write a file.
"""

from __future__ import annotations

import io
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return buffer.getvalue()


# What a trainer's held-out evaluations record, and in which unit: the VLM trainer's token cross-entropy, the
# sentence VAE's −ELBO (its training loss is Rec + β·R per sentence).
HELD_OUT = {"eval_loss": ("held-out loss", "cross-entropy (nats/token)"),
            "neg_elbo": ("held-out −ELBO", "loss (nats/sentence)")}


def training_curve_png(log: dict, title: str = "") -> bytes:
    """Training loss per optimizer step and held-out loss per evaluation, from a `train_log.json` of either trainer
    (`TrainLog`, `VAETrainLog`, as dicts); a VAE log also shows its training KL."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, evals = log.get("steps", []), log.get("evals", [])
    key = next((k for k in HELD_OUT if evals and k in evals[0]), "eval_loss")
    label, unit = HELD_OUT[key]
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss", alpha=0.6)
    if steps and "kl" in steps[0]:
        ax.plot([s["step"] for s in steps], [s["kl"] for s in steps], label="train KL", alpha=0.6)
    ax.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", label=label)
    if log.get("best_step") is not None:
        ax.axvline(log["best_step"], color="grey", linestyle=":", label=f"best (step {log['best_step']})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(unit)
    if title:
        ax.set_title(title)
    ax.legend()
    return _png(fig)


def vae_curves_png(log: dict) -> bytes:
    """A sentence VAE's `train_log.json` (`VAETrainLog` as a dict): reconstruction, KL and β per step; held-out
    KL and active units per evaluation."""
    plt = _pyplot()
    steps, evals = log["steps"], log["evals"]
    at = [s["step"] for s in steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(at, [s["rec"] for s in steps], label="reconstruction (nats/sentence)", alpha=0.6)
    top.plot(at, [s["kl"] for s in steps], label="KL (nats/sentence)", alpha=0.6)
    top.plot([e["step"] for e in evals], [e["kl"] for e in evals], "o-", label="held-out KL")
    top.set_yscale("symlog")
    top.legend()
    bottom.plot(at, [s["beta"] for s in steps], label="β")
    au = bottom.twinx()
    au.plot([e["step"] for e in evals], [e["au"] for e in evals], "s-", color="C3", label="held-out AU")
    au.set_ylabel("active units")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("β")
    fig.legend(loc="lower right")
    return _png(fig)


def metrics_bar_png(scores: dict, title: str = "") -> bytes:
    """One bar per numeric metric, its value written on the bar."""
    numeric = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(numeric) + 2), 3.5))
    bars = ax.bar(list(numeric), list(numeric.values()), color="#2a6fdb")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("score")
    ax.tick_params(axis="x", rotation=30)
    if title:
        ax.set_title(title)
    return _png(fig)


def write_png(data: bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
