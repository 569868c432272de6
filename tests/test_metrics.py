"""Metric modules checked against values computed by hand (worked out in the comments)."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hub.errors import HubError
from hub.evaluation.metrics import available_metrics, group_by_mr, load_metric

ROOT = Path(__file__).resolve().parent.parent
needs_java = pytest.mark.skipif(
    shutil.which("java") is None,
    reason="java is not on PATH: METEOR and the PTB tokeniser (ROUGE-L, CIDEr) run on Java",
)
# NIST length-penalty constant: penalty 0.5 at two thirds of the reference length.
BETA = -math.log(0.5) / math.log(1.5) ** 2


@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name) for name in available_metrics()}


# --- loading ---------------------------------------------------------------------------------


def test_unknown_metric_lists_the_available_ones():
    with pytest.raises(HubError, match="available metrics: .*e2e.*persona_f1.*sacrebleu"):
        load_metric("bleu")


def test_every_metric_loads_offline():
    code = "from hub.evaluation.metrics import available_metrics as a, load_metric as l; [l(n) for n in a()]"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)


def test_group_by_mr_keeps_first_occurrence_order():
    mrs = ["name[A]", "name[B]", "name[A]", "name[C]", "name[B]"]
    refs = ["a1", "b1", "a2", "c1", "b2"]
    assert group_by_mr(mrs, refs) == (
        ["name[A]", "name[B]", "name[C]"],
        [["a1", "a2"], ["b1", "b2"], ["c1"]],
    )
    with pytest.raises(HubError):
        group_by_mr(["name[A]"], [])


# --- e2e: BLEU and NIST (no Java needed) -------------------------------------------------------


def bleu_nist(metrics, predictions, references):
    scores = metrics["e2e"].compute(
        predictions=predictions, references=references, skip_java=True
    )
    assert set(scores) == {"bleu", "nist"}
    return scores["bleu"] / 100, scores["nist"]  # BLEU as the fraction mteval-v13a prints, to check by hand


def test_e2e_bleu_is_on_the_hubs_one_scale_0_to_100(metrics):
    scores = metrics["e2e"].compute(predictions=["a b c d"], references=[["a b c d"]], skip_java=True)
    assert scores["bleu"] == pytest.approx(100.0)


def test_e2e_exact_match(metrics):
    # Tokens (case-folded, "." split off): the cat sat on the mat .  -> 7 words, all matching,
    # so BLEU = 1. NIST information from the (single) reference:
    #   unigrams: info(the) = log2(7/2), the other five words log2(7/1); mean over 7 words
    #   bigrams:  info(the cat) = info(the mat) = log2(count(the)/count(bigram)) = log2(2) = 1,
    #             the other four bigrams log2(1/1) = 0; mean over 6 bigrams = 2/6
    #   3- to 5-grams: every prefix occurs once -> 0.  Lengths equal -> no length penalty.
    bleu, nist = bleu_nist(metrics, ["The cat sat on the mat."], [["the cat sat on the mat ."]])
    assert bleu == pytest.approx(1.0)
    assert nist == pytest.approx((2 * math.log2(3.5) + 5 * math.log2(7)) / 7 + 2 / 6)  # 2.85497


def test_e2e_bleu_worked_example(metrics):
    # hyp "a b c d" (c = 4), ref "a b c e f" (r = 5)
    # p1 = 3/4, p2 = 2/3 (a b, b c), p3 = 1/2 (a b c), p4 = 0/1 -> mteval smoothing 1/(2*1)
    # BP = exp(1 - 5/4);  BLEU = BP * (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 0.46308
    bleu, _ = bleu_nist(metrics, ["a b c d"], [["a b c e f"]])
    assert bleu == pytest.approx(math.exp(-0.25) * (1 / 8) ** 0.25)


def test_e2e_mteval_tokenisation(metrics):
    # Case-insensitive; "," and the final "." split off; "-" split after a digit: £20 - 25.
    bleu, _ = bleu_nist(metrics, ["The Eagle, £20-25."], [["the eagle , £20 - 25 ."]])
    assert bleu == pytest.approx(1.0)
    # "3.5" stays one word (period between digits): hyp = rated 3.5 stars today (4 words),
    # ref = rated 3 . 5 stars today (6). p1 = 3/4, p2 = 1/3 (stars today), p3 = 0/2 -> 1/(2*2),
    # p4 = 0/1 -> 1/(4*1) (the smoothing factor doubles per empty order). BP = exp(1 - 6/4).
    bleu, _ = bleu_nist(metrics, ["rated 3.5 stars today"], [["rated 3 . 5 stars today"]])
    assert bleu == pytest.approx(math.exp(-0.5) * (3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)


def test_e2e_brevity_uses_closest_reference_shorter_on_tie(metrics):
    # hyp has 4 words; refs have 3 and 5 -> tie, the shorter (3) counts, so no brevity penalty.
    # Every hyp n-gram occurs in the second ref: BLEU = 1 (it would be exp(1 - 5/4) with r = 5).
    bleu, _ = bleu_nist(metrics, ["a b c d"], [["a b c", "a b c d e"]])
    assert bleu == pytest.approx(1.0)


def test_e2e_nist_length_penalty(metrics):
    # hyp "a b", ref "a b c d": info(a) = info(b) = log2(4/1) = 2 -> 4 / 2 unigrams = 2;
    # info(a b) = log2(1/1) = 0. Length ratio 2/4: penalty exp(-BETA * ln(0.5)^2) = 0.13190.
    _, nist = bleu_nist(metrics, ["a b"], [["a b c d"]])
    assert nist == pytest.approx(2 * math.exp(-BETA * math.log(0.5) ** 2))  # 0.26381


def test_e2e_nist_reference_length_as_the_official_perl(metrics):
    # The case, checked against mteval-v13a-sig.pl after e2e-metrics fdfe692: NIST 2.8363, BLEU 0.5488.
    # Reference words: 6 + 2 + 2 + 2 = 12; counts a b c d x y 1 each, e 3, f 2, g 1.
    # Unigram info of the 5 matched output words: a, b, c log2(12); e log2(12/3); f log2(12/2).
    # Bigrams: "a b", "b c" log2(1/1) = 0; "e f" log2(count(e)/count(e f)) = log2(3/2); 3 output bigrams.
    # Trigram "a b c": 0. Reference length = 12 words / (4 non-empty refs / 2 segments) = 6 against 5 output words.
    # (The Python port's sum of per-segment means, 6 + 2 = 8, gives 1.2857; the largest count of references,
    # 12 / 3 = 4, no penalty at all.)
    # BLEU: every output n-gram matches (no 4-grams); closest lengths 6 + 2 = 8 against 5: BP = exp(1 - 8/5).
    bleu, nist = bleu_nist(metrics, ["a b c", "e f"], [["a b c d x y"], ["e f", "e f", "e g"]])
    gain = (3 * math.log2(12) + math.log2(4) + math.log2(6)) / 5 + math.log2(1.5) / 3
    assert nist == pytest.approx(gain * math.exp(-BETA * math.log(5 / 6) ** 2))
    assert nist == pytest.approx(2.8363, abs=1e-4)
    assert bleu == pytest.approx(math.exp(-0.6))
    assert bleu == pytest.approx(0.5488, abs=1e-4)


def test_e2e_nist_empty_references_as_the_official_perl(metrics):
    # Empty references (the E2E script pads each segment to the largest number of references with them; a
    # reference with no word after tokenisation is one) add no words and are not counted as references, but the
    # segments they pad count: padding the case changes nothing.
    padded = [["a b c d x y", "", " "], ["e f", "e f", "e g"]]
    assert bleu_nist(metrics, ["a b c", "e f"], padded) == pytest.approx((0.5488, 2.8363), abs=1e-4)
    # A segment with only empty references: reference words 4 + 2 + 1 = 7 over 3 non-empty references in 3
    # segments -> reference length 7 / (3 / 3) = 7 against 4 output words. Counts a 2, b 2, c 2, d 1:
    # a, b, c match with info log2(7/2) each, "x" matches nothing; bigram "a b" log2(2/2) = 0.
    # (Sum of per-segment means: 3 + 1 + 0 = 4, no penalty, 1.3555; counting empties: 7 / (7 / 3) = 3.)
    _, nist = bleu_nist(metrics, ["a b", "c", "x"], [["a b c d", "a b"], ["c", "", ""], ["", ""]])
    assert nist == pytest.approx(3 * math.log2(3.5) / 4 * math.exp(-BETA * math.log(4 / 7) ** 2))
    assert nist == pytest.approx(0.3620, abs=1e-4)


def test_e2e_bleu_closest_length_folds_from_the_first_reference(metrics):
    # mteval starts from the first reference's length and skips *later* empty references, so an empty first
    # reference counts as length 0: for "a b" against ["", "a b c d e"], |2 - 5| > |2 - 0| keeps r = 0 (no
    # brevity penalty); for "a b c d" |4 - 5| < 4 takes r = 5. p1 = 1, p2 = 1 (a b); "a b" has no 3-gram.
    bleu, _ = bleu_nist(metrics, ["a b"], [["", "a b c d e"]])
    assert bleu == pytest.approx(1.0)
    bleu, _ = bleu_nist(metrics, ["a b c d"], [["", "a b c d e"]])
    assert bleu == pytest.approx(math.exp(1 - 5 / 4))


def test_e2e_needs_java_unless_skipped(metrics, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(HubError, match="Java"):
        metrics["e2e"].compute(predictions=["a b"], references=[["a b"]])
    # BLEU and NIST need no Java. NIST: info(a) = info(b) = log2(2/1) = 1, mean 1; bigram 0.
    assert bleu_nist(metrics, ["a b"], [["a b"]]) == (pytest.approx(1.0), pytest.approx(1.0))


# --- e2e: METEOR, ROUGE-L, CIDEr (Java) --------------------------------------------------------

IDENTICAL = ["The Eagle is a cheap coffee shop near Burger King.", "Zizzi is a pub in the centre."]
CORPORA = {
    "identical": (IDENTICAL, [[s] for s in IDENTICAL]),
    "unrelated": (["Purple elephants dance", "Seven bright violins"], [[s] for s in IDENTICAL]),
    "cider": (["red pear", "green grass"], [["red apple"], ["green grass"]]),
    "rouge": (
        ["one two three four", "one two three four"],
        [["one two", "one two three four five six seven eight"], ["one three four five six"]],
    ),
    "empty": ([""], [["a b c"]]),
}


@pytest.fixture(scope="module")
def e2e_scores(metrics):
    """All Java-backed cases in one module-scoped pass (METEOR's JVM starts once)."""
    return {
        name: metrics["e2e"].compute(predictions=preds, references=refs)
        for name, (preds, refs) in CORPORA.items()
    }


@needs_java
def test_e2e_identical_outputs(e2e_scores):
    scores = e2e_scores["identical"]
    assert set(scores) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert scores["bleu"] == pytest.approx(100.0)  # the hub's one BLEU scale, 0-100, as sacreBLEU
    assert scores["meteor"] > 0.9
    assert scores["rouge_l"] == pytest.approx(1.0)
    # CIDEr-D: identical hyp/ref -> cosine 1 for n = 1..4 (n-grams shared by both segments get
    # IDF 0, the rest keep weight), no length penalty; mean 1, times 10.
    assert scores["cider"] == pytest.approx(10.0)


@needs_java
def test_e2e_unrelated_outputs(e2e_scores):
    scores = e2e_scores["unrelated"]
    assert scores["meteor"] < 0.1
    assert scores["rouge_l"] == 0.0
    assert scores["cider"] == 0.0


@needs_java
def test_e2e_cider_and_rouge_by_hand(e2e_scores):
    # CIDEr-D, 2 segments: IDF weight = log(2) - log(max(1, df)) = log 2 =: L for every n-gram
    # here (each occurs in one segment's refs; "pear" in none -> df floored to 1).
    # seg 1: unigrams hyp {red: L, pear: L} . ref {red: L, apple: L} / (|.| |.|) = L^2 / 2L^2
    #        = 1/2; bigrams "red pear" vs "red apple": 0; no 3-/4-grams: 0; mean 1/8 -> x10 = 1.25
    # seg 2: identical: uni 1, bi 1, tri 0, four 0 -> mean 1/2 -> 5.0.   Corpus: 3.125
    # ROUGE-L (beta 1.2): seg 1 LCS 1, P = R = 1/2 -> F = 1/2; seg 2 -> 1.  Mean 0.75
    scores = e2e_scores["cider"]
    assert scores["cider"] == pytest.approx(3.125)
    assert scores["rouge_l"] == pytest.approx(0.75)


@needs_java
def test_e2e_rouge_l_coco_definition(e2e_scores):
    # COCO takes the best precision and the best recall over refs separately:
    # seg 1: ref 1 (LCS 2): P = 2/4, R = 2/2; ref 2 (LCS 4): P = 4/4, R = 4/8 -> P = R = 1 -> 1.0
    # seg 2: LCS "one three four" = 3, P = 3/4, R = 3/5,
    #        F = (1 + 1.44) P R / (R + 1.44 P) = 1.098 / 1.68 = 0.653571
    scores = e2e_scores["rouge"]
    assert scores["rouge_l"] == pytest.approx((1.0 + 1.098 / 1.68) / 2)


@needs_java
def test_e2e_empty_output_scores_zero(e2e_scores):
    assert e2e_scores["empty"] == dict.fromkeys(["bleu", "nist", "meteor", "rouge_l", "cider"], 0.0)


# --- sacrebleu ---------------------------------------------------------------------------------


def test_sacrebleu_exact_and_worked_example(metrics):
    sacre = metrics["sacrebleu"]
    sentence = "the cat sat on the mat"
    exact = sacre.compute(predictions=[sentence], references=[sentence])
    assert exact["score"] == pytest.approx(100.0)
    # Same counts as the mteval worked example above (sacreBLEU's default "exp" smoothing is
    # mteval's): 100 * exp(1 - 5/4) * (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 46.308
    result = sacre.compute(predictions=["a b c d"], references=[["a b c e f"]])
    assert result["score"] == pytest.approx(100 * math.exp(-0.25) * (1 / 8) ** 0.25)
    assert result["signature"].startswith("nrefs:1|case:mixed|")


def test_sacrebleu_lowercase_and_variable_references(metrics):
    sacre = metrics["sacrebleu"]
    preds, refs = ["The Cat Sat Down", "a b c d"], [["the cat sat down"], ["x", "a b c d"]]
    assert sacre.compute(predictions=preds, references=refs)["score"] < 100
    result = sacre.compute(predictions=preds, references=refs, lowercase=True)
    assert result["score"] == pytest.approx(100.0)
    assert "nrefs:var|case:lc" in result["signature"]


# --- rouge -------------------------------------------------------------------------------------


def test_rouge_by_hand(metrics):
    # Stemming: cats -> cat. hyp: the cat sat (3), ref: the cat sat on the mat (6)
    # ROUGE-1: 3 overlaps, P = 1, R = 1/2 -> F = 2/3;  ROUGE-L: LCS 3, the same -> 2/3
    # ROUGE-2: hyp {the cat, cat sat}, ref has 5 bigrams incl. both: P = 1, R = 2/5 -> F = 4/7
    # Second pair identical -> 1 everywhere; scores are averaged over the two pairs.
    scores = metrics["rouge"].compute(
        predictions=["the cats sat", "hello world"],
        references=["the cat sat on the mat", "hello world"],
    )
    assert scores["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["rouge2"] == pytest.approx((4 / 7 + 1) / 2)
    assert scores["rougeL"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["rougeLsum"] == pytest.approx((2 / 3 + 1) / 2)


def test_rouge_takes_best_reference(metrics):
    scores = metrics["rouge"].compute(
        predictions=["the cats sat"], references=[["dogs run", "the cat sat on the mat"]]
    )
    assert scores["rouge1"] == pytest.approx(2 / 3)


# --- coqa --------------------------------------------------------------------------------------


def test_coqa_normalisation(metrics):
    # "The Cat!" -> lowercase, drop "!", drop "the" -> "cat"
    assert metrics["coqa"].compute(predictions=["The Cat!"], references=["cat"]) == {
        "f1": pytest.approx(100.0),
        "em": pytest.approx(100.0),
    }


def test_coqa_partial_overlap(metrics):
    # "a red car" -> [red, car]; "the red truck" -> [red, truck]: 1 common, P = R = 1/2 -> F1 1/2
    scores = metrics["coqa"].compute(predictions=["a red car"], references=["the red truck"])
    assert scores == {"f1": pytest.approx(50.0), "em": 0.0}


def test_coqa_leave_one_out_over_several_golds(metrics):
    # golds [red car, blue truck], pred "red car":
    #   hold out "red car" -> best of [blue truck] = 0
    #   hold out "blue truck" -> best of [red car] = 1
    #   -> (0 + 1) / 2 = 0.5 for both F1 and EM (a plain max would give 1).
    golds = [["red car", "blue truck"]]
    scores = metrics["coqa"].compute(predictions=["red car"], references=golds)
    assert scores == {"f1": pytest.approx(50.0), "em": pytest.approx(50.0)}


def test_coqa_empty_answers_and_averaging(metrics):
    # turn 1: both empty -> F1 1 and EM 1; turn 2: "yes" vs "no" -> 0.  Mean x 100 = 50.
    scores = metrics["coqa"].compute(predictions=["", "yes"], references=[[""], ["no"]])
    assert scores == {"f1": pytest.approx(50.0), "em": pytest.approx(50.0)}


# --- persona_f1 --------------------------------------------------------------------------------


def test_persona_f1_by_hand(metrics):
    # "I love my dog, Max!" -> [i, love, my, dog, max]; "i love dogs" -> [i, love, dogs]
    # common 2: P = 2/5, R = 2/3, F1 = 2 P R / (P + R) = 0.5333 / 1.0667 = 0.5
    scores = metrics["persona_f1"].compute(
        predictions=["I love my dog, Max!"], references=["i love dogs"]
    )
    assert scores["f1"] == pytest.approx(0.5)


def test_persona_f1_punctuation_becomes_space_and_best_reference(metrics):
    # ParlAI turns punctuation into spaces: "don't" -> [don, t], matching "don t" (not "dont").
    scores = metrics["persona_f1"].compute(predictions=["don't"], references=[["dont", "don t"]])
    assert scores["f1"] == pytest.approx(1.0)


def test_persona_bleu_exact_match(metrics):
    scores = metrics["persona_f1"].compute(
        predictions=["i have two dogs and a cat ."], references=["i have two dogs and a cat ."]
    )
    assert scores == {"f1": pytest.approx(1.0), "bleu": pytest.approx(100.0)}
