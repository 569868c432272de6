"""Backbone dtype on this machine: speed and greedy agreement with float32 on the E2E test MRs.

Publishes a trained E2E run into a temporary store, then for each dtype loads the backbone in it (adapters stay
float32: `hub.adapters.vlm` computes them in fp32 whatever the backbone), decodes the first `--limit` unique
test MRs greedily in fused batches, and compares each output with float32's: identical outputs, and the
share of tokens before the first difference.

    python -m bench.dtype_bench --base ../shared/models/gpt2-standin --run RUN --data ../shared/data/e2e/original
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine
from hub.serving.batch import decode_to_completion
from hub.evaluation.decode import unique_sources
from hub.model.backbone import load_backbone
from hub.serving.engine import Engine
from hub.serving.sampling import sampling_params
from hub.store.local import AdapterStore
from tasks import make_task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decode_all(base: str, device: str, dtype: torch.dtype, store: AdapterStore, ref: str, sources: list,
               batch: int, new_tokens: int) -> tuple[list[list[int]], float]:
    backbone = load_backbone(base, device, dtype=dtype)
    with Engine(backbone, make_task) as engine:
        name = engine.manager.add_adapter(store.load(ref, backbone.fingerprint)).name
        params = sampling_params(max_new_tokens=new_tokens)
        start, outputs = time.perf_counter(), []
        for i in range(0, len(sources), batch):
            sequences = [engine.new_sequence(name, s, params) for s in sources[i:i + batch]]
            outputs += [s.output_ids for s in decode_to_completion(engine, sequences)]
        return outputs, time.perf_counter() - start


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    def common_prefix(a, b):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return n / max(len(a), len(b), 1)

    return {"identical_outputs": sum(a == b for a, b in zip(reference, other)) / len(reference),
            "tokens_before_first_difference": sum(map(common_prefix, reference, other)) / len(reference)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--run", type=Path, required=True, help="a trained e2e run (its best/ is published)")
    parser.add_argument("--data", required=True, help="the E2E folder (testset_w_refs.csv)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--limit", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = AdapterStore(tempfile.mkdtemp(prefix="hub-dtype-"))
    ref = store.publish(args.run / "best", name="e2e").ref
    sources, _ = unique_sources(make_task("e2e").load_examples(args.data, "test"))
    sources = sources[: args.limit]
    runs = {}
    for name in args.dtypes.split(","):
        decode_all(args.base, args.device, DTYPES[name], store, ref, sources[: args.batch], args.batch, 4)  # warm-up
        outputs, seconds = decode_all(args.base, args.device, DTYPES[name], store, ref, sources, args.batch,
                                      args.new_tokens)
        tokens = sum(map(len, outputs))
        runs[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "outputs": outputs}
        print(name, f"{tokens / seconds:.1f} tok/s", flush=True)
    reference = runs["float32"]["outputs"]
    result = {"machine": machine(), "device": args.device, "mrs": len(sources), "new_tokens": args.new_tokens,
              "dtypes": {name: {**{k: v for k, v in run.items() if k != "outputs"},
                                "speed_vs_float32": run["tokens_per_s"] / runs["float32"]["tokens_per_s"],
                                **agreement(reference, run["outputs"])} for name, run in runs.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dtype_bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
