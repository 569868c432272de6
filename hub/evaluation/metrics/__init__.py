"""Evaluation metrics as `evaluate` modules kept in this repository.

Each metric lives in ``hub/evaluation/metrics/<name>/<name>.py`` and is loaded by local path, so loading
never touches the Hugging Face Hub and works offline.
"""

from collections.abc import Sequence
from pathlib import Path

import evaluate

from hub.errors import HubError

_METRICS_DIR = Path(__file__).parent


def available_metrics() -> list[str]:
    """Names that `load_metric` accepts."""
    return sorted(p.name for p in _METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load the metric ``name`` from this package (no network)."""
    names = available_metrics()
    if name not in names:
        raise HubError(f"Unknown metric {name!r}; available metrics: {', '.join(names)}.")
    return evaluate.load(str(_METRICS_DIR / name))


def group_by_mr(mrs: Sequence[str], refs: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Group (MR, reference) pairs the E2E way: one entry per unique MR, all its references.

    MRs keep the order of their first occurrence; a system then produces one output per
    returned MR and is scored against that MR's reference list.
    """
    if len(mrs) != len(refs):
        raise HubError(f"Got {len(mrs)} MRs but {len(refs)} references.")
    grouped: dict[str, list[str]] = {}
    for mr, ref in zip(mrs, refs):
        grouped.setdefault(mr, []).append(ref)
    return list(grouped), list(grouped.values())
