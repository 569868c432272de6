"""ROUGE-1/2/L/Lsum F-measures with Google's `rouge-score` package, Porter stemming on."""

import evaluate
from rouge_score import rouge_scorer

from hub.evaluation.metrics.references import metric_info, reference_lists

_DESCRIPTION = """\
Mean per-example ROUGE F-measure (fractions in [0, 1]) from the `rouge-score` package with the
Porter stemmer. With several references an example scores its best reference (per ROUGE type).
rougeLsum treats newlines as sentence boundaries (summary-level LCS).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: system outputs.
    references: one reference string, or a list of references, per prediction.
Returns:
    rouge1, rouge2, rougeL, rougeLsum: mean F-measures.
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
  title={{ROUGE}: A Package for Automatic Evaluation of Summaries}, author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out}, pages={74--81}, year={2004}
}
"""

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    """ROUGE via rouge-score; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION,
                           "https://github.com/google-research/google-research/tree/master/rouge")

    def _compute(
        self, predictions: list[str], references: list[str] | list[list[str]]
    ) -> dict[str, float]:
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        totals = dict.fromkeys(ROUGE_TYPES, 0.0)
        for prediction, refs in zip(predictions, reference_lists(references)):
            scores = scorer.score_multi(refs, prediction)
            for rouge_type in ROUGE_TYPES:
                totals[rouge_type] += scores[rouge_type].fmeasure
        return {t: total / max(len(predictions), 1) for t, total in totals.items()}
