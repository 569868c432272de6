"""METEOR, ROUGE-L and CIDEr as the MS-COCO caption evaluation bundled with e2e-metrics runs them.

The implementations are those of the `pycocoevalcap` package: the Stanford PTB tokenizer and
METEOR 1.5 jars, and its ROUGE-L and CIDEr(-D) scorers. Only the process plumbing is ours, so
that text always crosses into Java as UTF-8 whatever the locale, nothing is written into
site-packages, and METEOR's start-up (several seconds to load its paraphrase table) is paid once
per process rather than once per call.
"""

import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module

_PTB_JAR = Path(_ptb_module.__file__).parent / _ptb_module.STANFORD_CORENLP_3_4_1_JAR
_METEOR_JAR = Path(_meteor_module.__file__).parent / _meteor_module.METEOR_JAR
_UTF8 = "-Dfile.encoding=UTF-8"
# As COCO's wrapper runs METEOR: line protocol on stdin/stdout, English, normalised text.
_METEOR_ARGS = ["-", "-", "-stdio", "-l", "en", "-norm"]


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Lowercased PTB tokens joined by spaces, punctuation tokens dropped (COCO's tokenisation).

    All sentences go through one tokenizer run, one per line; whitespace inside a sentence is
    collapsed first so that no sentence can split into two lines.
    """
    text = "".join(" ".join(s.split()) + "\n" for s in sentences)
    command = ["java", _UTF8, "-cp", str(_PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer"]
    result = subprocess.run(
        [*command, "-preserveLines", "-lowerCase"],
        input=text.encode("utf-8"),
        capture_output=True,
        check=True,
    )
    lines = result.stdout.decode("utf-8").split("\n")[: len(sentences)]
    if len(lines) != len(sentences):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)}")
    punctuation = set(_ptb_module.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines]


class _MeteorProcess:
    """A METEOR 1.5 process in ``-stdio`` mode, as COCO's wrapper runs it (English, ``-norm``)."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            ["java", _UTF8, "-Xmx2G", "-jar", str(_METEOR_JAR), *_METEOR_ARGS],
            cwd=_METEOR_JAR.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait()

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(line.encode("utf-8") + b"\n")
        self._proc.stdin.flush()

    def _read(self) -> str:
        assert self._proc.stdout is not None
        answer = self._proc.stdout.readline().decode("utf-8").strip()
        if not answer:
            raise RuntimeError("the METEOR process stopped answering (out of memory?)")
        return answer

    def corpus_score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Corpus METEOR: sufficient statistics per segment, then one aggregate EVAL."""
        stats = []
        for hyp, refs in zip(hypotheses, references):
            hyp = hyp.replace("|||", "").replace("  ", " ")
            self._send(" ||| ".join(("SCORE", *refs, hyp)))
            stats.append(self._read())
        self._send(" ||| ".join(("EVAL", *stats)))
        for _ in stats:  # per-segment scores come first; only the aggregate is reported
            self._read()
        return float(self._read())


_meteor: _MeteorProcess | None = None
_meteor_lock = threading.Lock()


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus METEOR 1.5 of tokenised hypotheses; the Java process is kept for later calls."""
    global _meteor
    with _meteor_lock:
        if _meteor is None or not _meteor.alive:
            _meteor = _MeteorProcess()
        try:
            return _meteor.corpus_score(hypotheses, references)
        except BaseException:
            _meteor.kill()  # an exchange cut short leaves the line protocol out of step
            raise


def rouge_l_and_cider(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[float, float]:
    """Mean sentence ROUGE-L (beta 1.2) and corpus CIDEr-D, IDF taken from these references."""
    res = {i: [hyp] for i, hyp in enumerate(hypotheses)}
    gts = {i: list(refs) for i, refs in enumerate(references)}
    rouge_l, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return float(rouge_l), float(cider)
