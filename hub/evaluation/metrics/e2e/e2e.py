"""E2E NLG Challenge metrics, computed as the official `measure_scores.py` (tuetschek/e2e-metrics).

BLEU and NIST follow the challenge's mteval-v13a script (see `mteval.py`); METEOR, ROUGE-L and
CIDEr follow its MS-COCO caption evaluation, on PTB-tokenised text (see `coco.py`). Like the
official script, it expects one output per unique MR with all references of that MR grouped:
`hub.evaluation.metrics.group_by_mr` builds that grouping from (MR, reference) pairs.
"""

import shutil

import evaluate

from hub.errors import HubError
from hub.evaluation.metrics.references import PREDICTIONS_AND_REFERENCES, metric_info

from .coco import meteor, ptb_tokenize, rouge_l_and_cider
from .mteval import corpus_bleu_nist

_DESCRIPTION = """\
The five E2E NLG Challenge metrics as the official scorer prints them: BLEU, NIST (mteval-v13a,
case-insensitive), METEOR 1.5, ROUGE-L and CIDEr (MS-COCO caption evaluation). BLEU is on the 0–100
scale the hub uses everywhere (sacreBLEU's; the official scorer prints the fraction, BLEU/100); METEOR and
ROUGE-L are fractions in [0, 1]; NIST and CIDEr are unbounded. METEOR and the PTB tokenisation
that ROUGE-L and CIDEr use run on Java.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: one system output per unique MR.
    references: for each MR, the list of all its human references.
    skip_java: compute only BLEU and NIST, which need no Java (default False).
Returns:
    bleu, nist, and unless skip_java: meteor, rouge_l, cider.
"""

_CITATION = """\
@article{dusek2020e2e,
  title={Evaluating the state-of-the-art of End-to-End Natural Language Generation: The E2E NLG Challenge},
  author={Du{\\v{s}}ek, Ond{\\v{r}}ej and Novikova, Jekaterina and Rieser, Verena},
  journal={Computer Speech \\& Language}, volume={59}, pages={123--156}, year={2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class E2e(evaluate.Metric):
    """E2E challenge metric suite; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, "https://github.com/tuetschek/e2e-metrics",
                           features=PREDICTIONS_AND_REFERENCES[0])  # always a list of references per MR

    def _compute(
        self, predictions: list[str], references: list[list[str]], skip_java: bool = False
    ) -> dict[str, float]:
        if not predictions:
            raise HubError("E2E metrics need at least one prediction.")
        if not all(references):
            raise HubError("Every E2E prediction needs at least one reference.")
        bleu, nist = corpus_bleu_nist(predictions, references)
        scores = {"bleu": 100 * bleu, "nist": nist}
        if skip_java:
            return scores
        if shutil.which("java") is None:
            raise HubError(
                "E2E METEOR (and the PTB tokenisation that ROUGE-L and CIDEr use) needs Java 8 or "
                "newer on PATH: install a JRE (e.g. `apt-get install default-jre-headless`), or "
                "pass skip_java=True to compute BLEU and NIST only."
            )
        tokens = ptb_tokenize([*predictions, *(r for refs in references for r in refs)])
        hyps, ref_tokens = tokens[: len(predictions)], iter(tokens[len(predictions) :])
        refs = [[next(ref_tokens) for _ in seg_refs] for seg_refs in references]
        rouge_l, cider = rouge_l_and_cider(hyps, refs)
        scores.update(meteor=meteor(hyps, refs), rouge_l=rouge_l, cider=cider)
        return scores
