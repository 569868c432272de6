"""Corpus BLEU with the `sacrebleu` package, so scores carry a reproducibility signature."""

import evaluate
import sacrebleu

from hub.evaluation.metrics.references import metric_info, reference_lists, reference_streams

_DESCRIPTION = """\
Corpus-level BLEU (0-100) from sacreBLEU, with its signature string recording the settings.
Predictions may have different numbers of references.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: system outputs.
    references: one reference string, or a list of references, per prediction.
    lowercase: case-insensitive BLEU (default False).
    tokenize: sacreBLEU tokenizer name (default "13a", as for WMT).
Returns:
    score: corpus BLEU in [0, 100]; signature: sacreBLEU's signature of the settings used.
"""

_CITATION = """\
@inproceedings{post-2018-call,
  title={A Call for Clarity in Reporting {BLEU} Scores}, author={Post, Matt},
  booktitle={Proceedings of the Third Conference on Machine Translation}, pages={186--191}, year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Sacrebleu(evaluate.Metric):
    """sacreBLEU corpus BLEU; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "https://github.com/mjpost/sacrebleu")

    def _compute(
        self,
        predictions: list[str],
        references: list[str] | list[list[str]],
        lowercase: bool = False,
        tokenize: str = "13a",
    ) -> dict[str, float | str]:
        bleu = sacrebleu.BLEU(lowercase=lowercase, tokenize=tokenize)
        streams = reference_streams(reference_lists(references))
        # sacreBLEU skips a None reference (fewer references for a segment); its hints say str only
        result = bleu.corpus_score(predictions, streams)  # type: ignore[arg-type]
        return {"score": result.score, "signature": str(bleu.get_signature())}
