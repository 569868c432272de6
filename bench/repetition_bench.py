"""Repetition controls on the stand-in GPT-2: distinct-n and BLEU of a short-trained E2E adapter's greedy outputs on
the E2E test MRs, with and without `no_repeat_ngram_size` / `repetition_penalty` / presence and frequency penalties.

The adapter is trained by `hub train` for `--steps` steps (short on purpose: short-trained adapters are the ones
that loop), published into a store in the work folder, and decoded in-process by the serving engine in fused
batches, each setting as its own rows (`hub.serving.penalties`). distinct-n is the share of unique word n-grams
among all of the outputs' n-grams; BLEU is sacrebleu's corpus BLEU against every reference of an MR; "repeats" is
the share of outputs with a word 3-gram twice.

    nice -n 19 python -m bench.repetition_bench --doc docs/REPETITION.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import sacrebleu
import torch

from bench.common import SHARED, machine
from hub.model.backbone import load_backbone
from hub.serving.batch import decode_to_completion
from hub.serving.engine import Engine
from hub.serving.sampling import sampling_params
from hub.store.local import AdapterStore
from tasks import make_task

SETTINGS = {
    "greedy": {},
    "no_repeat_ngram_size 3": {"no_repeat_ngram_size": 3},
    "repetition_penalty 1.2": {"repetition_penalty": 1.2},
    "both": {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
    "presence 0.5 + frequency 0.5": {"presence_penalty": 0.5, "frequency_penalty": 0.5},
}


def train(base: Path, data: Path, out: Path, steps: int) -> Path:
    command = [sys.executable, "-m", "hub", "train", "e2e", "--base", str(base), "--data", str(data),
               "--max-steps", str(steps), "--eval-every", str(steps), "--batch-size", "8", "--grad-accum", "1",
               "--device", "cpu", "--out", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def test_mrs(data: Path, limit: int) -> tuple[list[str], list[list[str]]]:
    """The first `limit` unique test MRs and each one's references."""
    references: dict[str, list[str]] = defaultdict(list)
    for example in make_task("e2e").load_examples(str(data), "test"):
        references[example.source].append(example.target or "")
    mrs = list(references)[:limit]
    return mrs, [references[mr] for mr in mrs]


def decode(engine: Engine, name: str, mrs: list[str], fields: dict, batch: int) -> list[str]:
    outputs: list[str] = []
    for start in range(0, len(mrs), batch):
        sequences = [engine.new_sequence(name, mr, sampling_params(max_new_tokens=60, **fields))
                     for mr in mrs[start:start + batch]]
        outputs += [s.text for s in decode_to_completion(engine, sequences)]
    return outputs


def distinct(texts: list[str], n: int) -> float:
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def repeats(text: str, n: int = 3) -> bool:
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def scores(outputs: list[str], references: list[list[str]]) -> dict:
    width = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(width)]
    return {"bleu": sacrebleu.corpus_bleu(outputs, streams).score, "distinct_1": distinct(outputs, 1),
            "distinct_2": distinct(outputs, 2), "repeats": sum(map(repeats, outputs)) / len(outputs),
            "words": sum(len(o.split()) for o in outputs) / len(outputs)}


def report(rows: dict[str, dict], args: argparse.Namespace, seconds: float, example: dict[str, str]) -> str:
    lines = ["# Repetition controls", "",
             f"A short-trained E2E adapter (`hub train e2e`, {args.steps} steps, batch 8) on the stand-in GPT-2 "
             f"(`{args.base.name}`), greedy decoding of the first {args.limit} unique E2E test MRs "
             "(`python -m bench.repetition_bench`). distinct-n: unique word n-grams / all word n-grams over every "
             "output; repeats: outputs with a word 3-gram twice; BLEU: sacrebleu corpus BLEU against all references.",
             "", "| setting | BLEU | distinct-1 | distinct-2 | repeats | words/output |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['bleu']:.2f} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
                     f"{100 * r['repeats']:.0f} % | {r['words']:.1f} |")
    lines += ["", f"An MR: `{example['mr']}`", ""]
    lines += [f"- {name}: {example[name]!r}" for name in rows]
    lines += ["", f"{machine()}; {seconds:.0f} s in all (training included), one thread.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=SHARED / "models/gpt2-standin")
    parser.add_argument("--data", type=Path, default=SHARED / "data/e2e/original")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--limit", type=int, default=200, help="unique test MRs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hub-repetition"))
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    run = args.work / "run"
    if not (run / "best").is_dir():
        train(args.base, args.data, run, args.steps)
    store = AdapterStore(args.work / "store")
    if not store.list():
        store.publish(run / "best", name="e2e")
    engine = Engine(load_backbone(str(args.base), "cpu"), make_task)
    engine.manager.add_adapter(store.load("e2e"))
    mrs, references = test_mrs(args.data, args.limit)
    outputs = {name: decode(engine, "e2e", mrs, fields, args.batch) for name, fields in SETTINGS.items()}
    rows = {name: scores(texts, references) for name, texts in outputs.items()}
    example = {"mr": mrs[0], **{name: texts[0] for name, texts in outputs.items()}}
    text = report(rows, args, time.time() - started, example)
    print(text)
    if args.doc:
        args.doc.write_text(text)


if __name__ == "__main__":
    main()
