"""Fairness benchmark (issue 20): one client floods one adapter while another sends one request per second to
another adapter; first come, first served against the virtual token counter (`hub.serving.fairness`), one run.

The runner in process (no HTTP: the admission order is what is measured), the stand-in GPT-2
(`../shared/models/gpt2-standin`, or `--base`) with two random VLM adapters. The light client's latency is
measured alone first (its unloaded value); then, per policy, the flood's requests are all queued at once and the
light client sends `--light` requests one per second. Reported: the light client's p50/p99 latency and its ratio
to the unloaded p99, the flood's makespan, and total throughput (generated tokens / time from the first request
to the last answer) with its ratio to FCFS's.

    nice -n 5 python -m bench.fairness_bench --out docs     # docs/fairness_bench.json; the table for BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from bench.common import SHARED, machine, percentile, random_adapter
from hub.model.backbone import load_backbone
from hub.serving.engine import Engine
from hub.serving.fairness import FairAdmission, FirstComeFirstServed
from hub.serving.sampling import SamplingParams
from hub.serving.scheduler import Scheduler
from hub.serving.sequence import Sequence
from tasks import make_task

STANDIN = SHARED / "models" / "gpt2-standin"
TASK_TYPE = "e2e"
SOURCE = "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], area[riverside]"
POLICIES = {"fcfs": FirstComeFirstServed, "fair": FairAdmission}


def new_engine(base: Path) -> Engine:
    engine = Engine(load_backbone(str(base), "cpu"), make_task)
    rows = len(make_task(TASK_TYPE).special_tokens)
    for seed, name in enumerate(("flooded", "light")):
        engine.manager.add_adapter(random_adapter(name, engine.backbone.model.config, 16, TASK_TYPE, rows, seed))
    return engine


class Client:
    """Submits sequences for one adapter and records each one's latency (submission to its last token)."""

    def __init__(self, engine: Engine, scheduler: Scheduler, adapter: str, name: str, new_tokens: int):
        self.engine, self.scheduler, self.adapter, self.name = engine, scheduler, adapter, name
        self.params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, client=name)
        self.latencies: list[float] = []
        self.tokens = 0
        self.pending = 0
        self.done = threading.Condition()

    def sequence(self) -> Sequence:
        sequence = self.engine.new_sequence(self.adapter, SOURCE, self.params)
        submitted = time.perf_counter()

        def finished(s: Sequence) -> None:
            if s.finished:
                with self.done:
                    self.latencies.append(time.perf_counter() - submitted)
                    self.tokens += len(s.output_ids)
                    self.pending -= 1
                    self.done.notify_all()

        sequence.on_update = finished
        with self.done:
            self.pending += 1
        return sequence

    def send(self, count: int) -> None:
        self.scheduler.submit_all([self.sequence() for _ in range(count)])

    def wait(self) -> None:
        with self.done:
            self.done.wait_for(lambda: self.pending == 0)


def run(engine: Engine, policy: str, args: argparse.Namespace, flood: int, light: int) -> dict:
    """One loaded run: the light client's latencies, and every generated token over the wall time."""
    scheduler = Scheduler(engine, max_batch=args.max_batch, max_queue=flood + light + 8)
    scheduler.fairness = POLICIES[policy]()
    scheduler.start()
    try:
        heavy = Client(engine, scheduler, "flooded", "flood", args.new_tokens)
        lone = Client(engine, scheduler, "light", "light", args.new_tokens)
        start = time.perf_counter()
        heavy.send(flood)
        for i in range(light):
            time.sleep(max(0.0, start + i * args.interval - time.perf_counter()))
            lone.send(1)
        heavy.wait()
        lone.wait()
        wall = time.perf_counter() - start
    finally:
        scheduler.stop(60)
    return {"policy": policy, "light_latencies_s": lone.latencies, "flood_requests": len(heavy.latencies),
            "seconds": wall, "tokens": heavy.tokens + lone.tokens, "steps": scheduler.steps}


def pooled(policy: str, runs: list[dict]) -> dict:
    """A policy's runs together: the light client's latencies pooled, tokens over seconds summed."""
    mine = [r for r in runs if r["policy"] == policy]
    latencies = [t for r in mine for t in r["light_latencies_s"]]
    seconds = sum(r["seconds"] for r in mine)
    return {"policy": policy, "runs": len(mine), "light_requests": len(latencies),
            "light_p50_s": percentile(latencies, 50), "light_p99_s": percentile(latencies, 99),
            "seconds": seconds / len(mine), "tokens_per_s": sum(r["tokens"] for r in mine) / seconds,
            "step_ms": 1000 * seconds / sum(r["steps"] for r in mine)}


def unloaded(engine: Engine, args: argparse.Namespace) -> tuple[list[float], float]:
    """The light client alone: its latencies, and the time of one step (a one-row batch)."""
    scheduler = Scheduler(engine, max_batch=args.max_batch)
    scheduler.start()
    try:
        lone = Client(engine, scheduler, "light", "light", args.new_tokens)
        for _ in range(args.light):
            lone.send(1)
            lone.wait()
    finally:
        scheduler.stop(60)
    return lone.latencies, sum(lone.latencies) / max(1, scheduler.steps)


def table(report: dict) -> str:
    """The policies side by side; "in steps" divides a latency by its run's mean step time (the unloaded one by
    a one-row step), which tells waiting for a row apart from decoding in a bigger batch."""
    rows = ["| policy | light p50 (s) | light p99 (s) | p99 / unloaded p99 | step (ms) | light p99 in steps | "
            "mean makespan (s) | tokens/s | throughput / FCFS |", "|---|---|---|---|---|---|---|---|---|"]
    base, step = report["unloaded_p99_s"], report["unloaded_step_ms"]
    fcfs = next(r for r in report["runs"] if r["policy"] == "fcfs")["tokens_per_s"]
    rows.append(f"| alone | {report['unloaded_p50_s']:.3f} | {base:.3f} | 1x | {step:.1f} | "
                f"{1000 * base / step:.1f} | | | |")
    for r in report["runs"]:
        rows.append(f"| {r['policy']} | {r['light_p50_s']:.3f} | {r['light_p99_s']:.3f} | "
                    f"{r['light_p99_s'] / base:.2f}x | {r['step_ms']:.1f} | {1000 * r['light_p99_s'] / r['step_ms']:.1f} | "
                    f"{r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / fcfs:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=STANDIN)
    parser.add_argument("--flood", type=int, default=1000, help="enough to outlast the light client's requests")
    parser.add_argument("--light", type=int, default=20, help="the light client's requests (one per --interval)")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="runs per policy, in ABBA order (a shared machine's "
                        "load drifts)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = new_engine(args.base)
    alone, step_before = unloaded(engine, args)
    order = [p for i in range(args.rounds) for p in (list(POLICIES) if i % 2 == 0 else list(POLICIES)[::-1])]
    runs = [run(engine, policy, args, args.flood, args.light) for policy in order]
    after, step_after = unloaded(engine, args)  # before and after: the machine's load drifts
    alone += after
    report = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
              "unloaded_p50_s": percentile(alone, 50), "unloaded_p99_s": percentile(alone, 99),
              "unloaded_step_ms": 1000 * (step_before + step_after) / 2,
              "runs": [pooled(policy, runs) for policy in POLICIES], "each_run": runs}
    print(json.dumps(report, indent=2))
    print(table(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fairness_bench.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
