"""PersonaChat metrics: ParlAI's unigram F1 and corpus sacreBLEU."""

import re
import string
from collections import Counter

import evaluate
import sacrebleu

from hub.evaluation.metrics.references import metric_info, reference_lists, reference_streams

_DESCRIPTION = """\
Unigram F1 as ParlAI computes it for PersonaChat: both sides lowercased, every punctuation
character replaced by a space, articles a/an/the removed, whitespace collapsed; token-level
precision/recall/F1 (0 when nothing overlaps), best reference per example, mean over examples
as a fraction in [0, 1]. Also corpus BLEU (0-100) from sacreBLEU on the raw text.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: model responses.
    references: one gold response, or a list of them, per prediction.
Returns:
    f1: mean unigram F1 in [0, 1]; bleu: corpus sacreBLEU in [0, 100].
"""

_CITATION = """\
@inproceedings{zhang-etal-2018-personalizing,
  title={Personalizing Dialogue Agents: {I} have a dog, do you have pets too?},
  author={Zhang, Saizheng and Dinan, Emily and Urbanek, Jack and Szlam, Arthur and Kiela, Douwe and Weston, Jason},
  booktitle={Proceedings of ACL}, pages={2204--2213}, year={2018}
}
"""

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> list[str]:
    """ParlAI's answer normalisation, split into tokens."""
    return _ARTICLES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).split()


def unigram_f1(pred: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize(pred), normalize(gold)
    same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if not same:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PersonaF1(evaluate.Metric):
    """PersonaChat F1 and BLEU; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "https://parl.ai/projects/personachat/")

    def _compute(
        self, predictions: list[str], references: list[str] | list[list[str]]
    ) -> dict[str, float]:
        ref_lists = reference_lists(references)
        f1 = sum(max(unigram_f1(p, g) for g in refs) for p, refs in zip(predictions, ref_lists))
        # sacreBLEU skips a None reference (fewer references for a segment); its hints say str only
        bleu = sacrebleu.corpus_bleu(predictions, reference_streams(ref_lists)).score  # type: ignore[arg-type]
        return {"f1": f1 / max(len(predictions), 1), "bleu": bleu}
