"""CoQA F1 and exact match, as the official CoQA evaluation script (v1.0) defines them."""

import re
import string
from collections import Counter

import evaluate

from hub.evaluation.metrics.references import metric_info, reference_lists

_DESCRIPTION = """\
CoQA answer metrics, percentages as the official script reports them. Answers are normalised
(lowercase, punctuation removed, articles a/an/the removed, whitespace collapsed); F1 is over
tokens. With one gold answer a turn scores against it; with n > 1 gold answers the official
script averages, over each held-out gold answer, the best score against the n - 1 others.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: predicted answers, one per turn.
    references: the gold answer, or list of gold answers, of each turn.
Returns:
    f1, em: means over turns, times 100.
"""

_CITATION = """\
@article{reddy-etal-2019-coqa,
  title={{C}o{QA}: A Conversational Question Answering Challenge},
  author={Reddy, Siva and Chen, Danqi and Manning, Christopher D.},
  journal={Transactions of the Association for Computational Linguistics}, volume={7},
  pages={249--266}, year={2019}
}
"""

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """The official normalisation: lowercase, drop punctuation, drop articles, tidy spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def f1(gold: str, pred: str) -> float:
    """Token F1; if either side normalises to nothing, 1 when both do and 0 otherwise."""
    gold_tokens, pred_tokens = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if not same:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def turn_scores(golds: list[str], pred: str) -> tuple[float, float]:
    """(F1, EM) of one turn: leave-one-out average of best-gold scores when n > 1 golds."""
    if len(golds) == 1:
        return f1(golds[0], pred), exact(golds[0], pred)
    f1_sum = em_sum = 0.0
    for i in range(len(golds)):
        others = golds[:i] + golds[i + 1 :]
        f1_sum += max(f1(g, pred) for g in others)
        em_sum += max(exact(g, pred) for g in others)
    return f1_sum / len(golds), em_sum / len(golds)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Coqa(evaluate.Metric):
    """CoQA F1/EM; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "https://stanfordnlp.github.io/coqa/")

    def _compute(
        self, predictions: list[str], references: list[str] | list[list[str]]
    ) -> dict[str, float]:
        scores = [
            turn_scores(golds, pred) for pred, golds in zip(predictions, reference_lists(references))
        ]
        n = max(len(scores), 1)
        return {
            "f1": 100 * sum(turn_f1 for turn_f1, _ in scores) / n,
            "em": 100 * sum(turn_em for _, turn_em in scores) / n,
        }
