"""What the text metrics share: their input features and reference handling."""

from __future__ import annotations

import datasets
import evaluate

_STRING = datasets.Value("string")
# One reference list per prediction, or a single reference string per prediction.
PREDICTIONS_AND_REFERENCES = [
    datasets.Features({"predictions": _STRING, "references": datasets.Sequence(_STRING)}),
    datasets.Features({"predictions": _STRING, "references": _STRING}),
]


def reference_lists(references: list[str] | list[list[str]]) -> list[list[str]]:
    """Every prediction's references as a list."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


def reference_streams(ref_lists: list[list[str]]) -> list[list[str | None]]:
    """sacreBLEU's layout: stream i holds each prediction's i-th reference (None where it has fewer)."""
    count = max((len(refs) for refs in ref_lists), default=0)
    return [[refs[i] if i < len(refs) else None for refs in ref_lists] for i in range(count)]


def metric_info(description: str, citation: str, inputs: str, url: str,
                features=PREDICTIONS_AND_REFERENCES) -> evaluate.MetricInfo:
    """The `evaluate.MetricInfo` every module here returns from `_info`."""
    return evaluate.MetricInfo(description=description, citation=citation, inputs_description=inputs,
                               features=features, reference_urls=[url])
