"""Serving throughput: fused mixed-task batches vs per-request swapping vs AdapterHub `BatchSplit`.

One run, one machine, the same prompts: a random-weight `GPT2Config()` (124 M) with the real GPT-2 tokenizer,
VLM adapters at bottleneck 100, prompts of 32 tokens, 16 new tokens, greedy. Scenarios:

  a  8 requests, one task                 (hub engine)
  b  8 requests, 8 distinct tasks         (hub engine)
  c  32 requests, 32 distinct tasks       (hub engine)
  c1 32 requests, one task                (hub engine)
  d  the 32 requests of (c), naive server: swap the active adapter per request, batch 1 (`adapters` + generate)
  e  the 32 requests of (c) in one batch through AdapterHub `BatchSplit` (`adapters` + generate)
  f  8 requests, frozen base, no adapter  (hub engine)
  f1 32 requests, frozen base, no adapter (hub engine): the ceiling for (c)

    python -m bench.serve_bench --out docs    # writes docs/serve_bench.json, .md and .png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import adapters
import torch
from adapters.composition import BatchSplit
from transformers import GPT2LMHeadModel

from bench.common import add_to_adapters_model, machine, percentile, random_adapter, random_gpt2_small, timed_run
from hub.model.backbone import load_backbone
from hub.serving.engine import Engine
from hub.serving.sampling import sampling_params
from tasks import make_task

PROMPT_TOKENS, NEW_TOKENS, BOTTLENECK = 32, 16, 100


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """Distinct prompts of exactly `length` tokens (ordinary English words, so nothing is degenerate)."""
    words = "the a cat dog sat on mat ran fast slow house tree river city green blue small large old new".split()
    out = []
    for i in range(count):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(length * 2))
        out.append(tokenizer.encode(text)[:length])
    return out


def run_engine(engine: Engine, tasks: list[str | None], prompt_ids: list[list[int]]) -> dict:
    """All requests submitted together, decoded in fused batches; per-request latency = its finish time."""
    params = sampling_params(max_new_tokens=NEW_TOKENS)
    sequences = []
    for task, ids in zip(tasks, prompt_ids):
        if task is None:
            sequences.append(engine.new_sequence(None, None, params, prompt_text=engine.backbone.tokenizer.decode(ids)))
        else:
            source = engine.backbone.tokenizer.decode(ids[: PROMPT_TOKENS - 3])  # + BOS, source and target markers = 32
            sequences.append(engine.new_sequence(task, source, params))
    wall, latencies = timed_run(engine, sequences)
    return _result(wall, latencies, sum(len(s.output_ids) for s in sequences), [len(s.prompt_ids) for s in sequences])


def _result(wall: float, latencies: list[float], tokens: int, prompt_lengths: list[int]) -> dict:
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "prompt_tokens": sum(prompt_lengths) / len(prompt_lengths)}


def generate_library(model, input_ids: list[list[int]]) -> torch.Tensor:
    width = max(map(len, input_ids))
    ids = torch.tensor([[0] * (width - len(x)) + x for x in input_ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in input_ids])
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def run_naive_swap(model, names: list[str], prompt_ids: list[list[int]]) -> dict:
    """A naive server: one request at a time, activating its adapter first."""
    start, latencies = time.perf_counter(), []
    for name, ids in zip(names, prompt_ids):
        model.set_active_adapters(name)
        generate_library(model, [ids])
        latencies.append(time.perf_counter() - start)
    return _result(time.perf_counter() - start, latencies, NEW_TOKENS * len(names), [len(p) for p in prompt_ids])


def run_batch_split(model, names: list[str], prompt_ids: list[list[int]]) -> dict:
    model.active_adapters = BatchSplit(*names, batch_sizes=[1] * len(names))
    start = time.perf_counter()
    generate_library(model, prompt_ids)
    wall = time.perf_counter() - start
    return _result(wall, [wall] * len(names), NEW_TOKENS * len(names), [len(p) for p in prompt_ids])


def best_of(repeats: int, fn, *args) -> dict:
    """The fastest of `repeats` runs (after one warm-up), which is the least disturbed by other load."""
    fn(*args)
    return min((fn(*args) for _ in range(repeats)), key=lambda r: r["seconds"])


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    folder = random_gpt2_small()
    backbone = load_backbone(str(folder), args.device)
    config = backbone.model.config
    engine = Engine(backbone, make_task)
    k = len(make_task("text2text").special_tokens)
    task_adapters = [random_adapter(f"task{i}", config, BOTTLENECK, "text2text", k, seed=i) for i in range(32)]
    for adapter in task_adapters:
        engine.manager.add_adapter(adapter)
    names = [a.name for a in task_adapters]
    p8, p32 = prompts(backbone.tokenizer, 8, PROMPT_TOKENS), prompts(backbone.tokenizer, 32, PROMPT_TOKENS)

    library = GPT2LMHeadModel.from_pretrained(folder).eval()
    adapters.init(library)
    for adapter in task_adapters:
        add_to_adapters_model(library, adapter)

    results = {
        "a": best_of(args.repeats, run_engine, engine, names[:1] * 8, p8),
        "b": best_of(args.repeats, run_engine, engine, names[:8], p8),
        "c": best_of(args.repeats, run_engine, engine, names, p32),
        "c1": best_of(args.repeats, run_engine, engine, names[:1] * 32, p32),
        "d": best_of(1, run_naive_swap, library, names, p32),
        "e": best_of(args.repeats, run_batch_split, library, names, p32),
        "f": best_of(args.repeats, run_engine, engine, [None] * 8, p8),
        "f1": best_of(args.repeats, run_engine, engine, [None] * 32, p32),
    }
    report(results, args.out)


LABELS = {
    "a": "(a) 8 requests, one task",
    "b": "(b) 8 requests, 8 tasks",
    "c": "(c) 32 requests, 32 tasks",
    "c1": "(c1) 32 requests, one task",
    "d": "(d) 32 tasks, swap per request, batch 1",
    "e": "(e) 32 tasks, AdapterHub BatchSplit",
    "f": "(f) 8 requests, frozen base",
    "f1": "(f1) 32 requests, frozen base",
}
TARGETS = [("b", "a", 0.95), ("c", "c1", 0.90), ("c", "d", 5.0), ("a", "f", 0.95), ("c", "e", 1.3),
           ("c", "f1", None), ("f1", "e", None)]


def report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_bench.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    lines = [f"Machine: {machine()}. GPT2Config() random weights, real GPT-2 tokenizer, bottleneck 100, "
             f"prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, greedy.", "",
             "| scenario | generated tokens/s | p50 latency (s) | p99 latency (s) |", "|---|---|---|---|"]
    lines += [f"| {LABELS[k]} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} |"
              for k, r in results.items()]
    lines += ["", "| ratio | measured | target | met |", "|---|---|---|---|"]
    for num, den, target in TARGETS:
        ratio = results[num]["tokens_per_s"] / results[den]["tokens_per_s"]
        if target is None:
            lines.append(f"| ({num})/({den}) | {ratio:.2f} | (reference) | |")
        else:
            lines.append(f"| ({num})/({den}) | {ratio:.2f} | ≥ {target} | {'yes' if ratio >= target else 'no'} |")
    (out / "serve_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(results, out / "serve_bench.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    keys = list(results)
    ax.barh([LABELS[k] for k in keys], [results[k]["tokens_per_s"] for k in keys], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens/s (higher is better)")
    ax.set_title("GPT-2 small (random), bottleneck-100 adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
