"""Corpus BLEU and NIST as the E2E challenge's mteval-v13a scorer computes them.

The official numbers come from `mteval-v13a-sig.pl` as adapted for the E2E challenge (variable
number of references per segment). Its behaviour, reproduced here:

* text is normalised by mteval's default (non-international) tokenisation, case-insensitively
  (only ASCII letters are lowercased, as Perl's ``tr/A-Z/a-z/`` does);
* BLEU: clipped n-gram precisions up to 4; brevity penalty ``exp(min(0, 1 - r/c))`` with ``r``
  the summed length of each segment's reference closest in length to the output (ties go to the
  shorter one; empty references after the first are skipped); an n-gram order with no match
  counts as ``1 / (2^k * total)`` for the k-th such order (mteval's smoothing) instead of zeroing
  BLEU;
* NIST up to 5-grams with information weights ``log2(count(prefix) / count(ngram))`` counted
  over every reference of the corpus, and the length penalty taken against the corpus reference
  length as the Perl script computes it after e2e-metrics commit fdfe692 ("NIST to work with
  average number of non-empty references"): the total number of reference words divided by the
  average number of non-empty references per segment, ``ref_words / (nonempty_refs / segments)``.
  A reference is empty when it has no word after tokenisation (the E2E script pads every segment
  to the largest number of references with empty ones); empty references add no words but the
  segments they pad still count. The Perl divides by zero when no reference has a word; we
  apply no length penalty then.

The Python port in the same repository (``pymteval.py``, ``measure_scores.py -p``) differs from
the Perl in three places, and we follow the Perl, which is the scorer's default: it takes the
NIST reference length as the sum over segments of each segment's mean non-empty reference
length (equal to the Perl's only when every segment has the same number of non-empty references
or the same mean reference length);
it counts negative n-gram totals where an output is shorter than an n-gram order; and it floors
the precision of an n-gram order with no match near zero.
"""

import math
import re
from collections import Counter
from collections.abc import Sequence

BLEU_ORDER = 4
NIST_ORDER = 5
# Which NIST reference-length rule scored a result: benchmarks record it beside their scores, so a report can tell
# NIST values of an earlier rule (stale) from current ones.
NIST_RULE = "mteval-v13a-sig.pl after e2e-metrics fdfe692"

# mteval's "tokenize punctuation" class: ASCII symbols except ' - . , (those have own rules).
_PUNCT = re.compile(r"([{-~\[-` -&(-+:-@/])")
_ENTITIES = {"&quot;": '"', "&amp;": "&", "&lt;": "<", "&gt;": ">"}
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# NIST length penalty: 0.5 when the output is two thirds of the average reference length.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2

Ngram = tuple[str, ...]


def tokenize(text: str) -> list[str]:
    """Split ``text`` into mteval-v13a words (default tokenisation, lowercased)."""
    # mteval reads segments from SGML with every whitespace run collapsed to one space first.
    text = " ".join(text.split()).replace("<skipped>", "")
    for entity, char in _ENTITIES.items():
        text = text.replace(entity, char)
    text = f" {text} ".translate(_ASCII_LOWER)
    text = _PUNCT.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)  # period/comma unless preceded by a digit
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)  # ... unless followed by a digit
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)  # dash after a digit
    return text.split()


def _ngrams(words: Sequence[str], max_n: int) -> Counter[Ngram]:
    """Counts of every n-gram of ``words`` with 1 <= n <= max_n."""
    return Counter(
        tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1)
    )


def _closest_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """Reference length closest to the output's, the shorter on a tie, folded as mteval does.

    The fold starts from the first reference's length and skips every later empty reference, so
    an empty *first* reference counts as length 0 (E2E pads with empty references at the end)."""
    current = ref_lens[0] if ref_lens else 0
    for length in ref_lens[1:]:
        if length and (abs(hyp_len - length), length) < (abs(hyp_len - current), current):
            current = length
    return current


def nist_reference_length(refs: Sequence[Sequence[Sequence[str]]]) -> float:
    """mteval-v13a-sig.pl's NIST reference length: reference words ÷ (non-empty references ÷ segments).

    ``refs`` holds each segment's tokenised references; 0 when no reference has a word."""
    words = sum(len(ref) for seg_refs in refs for ref in seg_refs)
    nonempty = sum(1 for seg_refs in refs for ref in seg_refs if ref)
    return words * len(refs) / nonempty if nonempty else 0.0


def _nist_length_penalty(ratio: float) -> float:
    """NIST brevity factor: 1 at or above the reference length, 0.5 at two thirds of it."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def corpus_bleu_nist(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[float, float]:
    """Document-level (BLEU, NIST) of ``predictions`` against per-segment reference lists."""
    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(r) for r in seg_refs] for seg_refs in references]

    # NIST information weights come from n-gram counts over all references of the corpus.
    ref_counts: Counter[Ngram] = Counter()
    for seg_refs in refs:
        for ref in seg_refs:
            ref_counts.update(_ngrams(ref, NIST_ORDER))
    ref_words = sum(len(ref) for seg_refs in refs for ref in seg_refs)
    ref_counts[()] = ref_words

    max_n = max(BLEU_ORDER, NIST_ORDER)
    matches = [0] * (max_n + 1)  # clipped matches per order
    totals = [0] * (max_n + 1)  # output n-grams per order
    info = [0.0] * (max_n + 1)  # information of the clipped matches per order
    closest_ref_len = 0
    for hyp, seg_refs in zip(hyps, refs):
        hyp_counts = _ngrams(hyp, max_n)
        max_ref_counts: Counter[Ngram] = Counter()
        for ref in seg_refs:
            max_ref_counts |= _ngrams(ref, max_n)
        for ngram, count in hyp_counts.items():
            clipped = min(count, max_ref_counts[ngram])
            if clipped:
                n = len(ngram)
                matches[n] += clipped
                info[n] += clipped * math.log2(ref_counts[ngram[:-1]] / ref_counts[ngram])
        for n in range(1, max_n + 1):
            totals[n] += max(0, len(hyp) - n + 1)
        closest_ref_len += _closest_length(len(hyp), [len(r) for r in seg_refs])

    hyp_words = totals[1]
    log_precision = 0.0
    smoothing = 1
    for n in range(1, BLEU_ORDER + 1):
        if totals[n] and matches[n]:
            log_precision += math.log(matches[n] / totals[n])
        elif totals[n]:
            smoothing *= 2
            log_precision -= math.log(smoothing * totals[n])
    brevity = math.exp(min(0.0, 1 - closest_ref_len / hyp_words)) if hyp_words else 0.0
    bleu = brevity * math.exp(log_precision / BLEU_ORDER)

    avg_ref_len = nist_reference_length(refs)
    nist_gain = sum(info[n] / max(totals[n], 1) for n in range(1, NIST_ORDER + 1))
    ratio = hyp_words / avg_ref_len if avg_ref_len else 1.0
    nist = nist_gain * _nist_length_penalty(ratio)
    return bleu, nist
