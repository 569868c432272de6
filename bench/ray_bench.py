"""Scale-out figures for docs/DEPLOY.md: `hub serve --ray` with 1 vs 2 engine replicas (closed-loop clients over
six tasks on a local Ray cluster: requests/s, p50/p99 latency), and adapter load time from an S3-compatible object
store (moto's server on 127.0.0.1, through s3fs; cold local cache) vs the local folder store.

    python -m bench.ray_bench --base ../shared/models/gpt2-standin --run .demo/run --out docs
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine, percentile
from bench.load_test import free_port, load, load_arguments, start_server
from hub.model.backbone import load_backbone
from hub.store.local import AdapterStore

TASKS = 6


def serve_with_replicas(store: Path, base: str, replicas: int, clients: int, seconds: float, work: Path) -> dict:
    port = free_port()
    extra = ["--ray", "--replicas", str(replicas), "--max-tasks-per-replica", str(TASKS)]
    server = start_server(store, base, port, work / f"ray-{replicas}.log", extra, ready_timeout_s=300)
    url = f"http://127.0.0.1:{port}"
    tasks = [f"task{i}" for i in range(TASKS)]
    try:
        asyncio.run(load(url, clients=len(tasks), seconds=5, tasks=tasks))  # warm-up: every task loaded once
        stats = asyncio.run(load(url, clients, seconds, tasks))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    latencies = stats["latencies"]
    return {"replicas": replicas, "clients": clients, "seconds": stats["wall"], "answered_200": len(latencies),
            "status_counts": dict(stats["status"]), "requests_per_s": len(latencies) / stats["wall"],
            "tokens_per_s": stats["tokens"] / stats["wall"], "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99)}


def load_times(store, refs: list[str], fingerprint: dict, cache: Path | None) -> list[float]:
    """Seconds per `store.load` (files fetched, sha256 verified, tensors read); the cache emptied before each."""
    times = []
    for ref in refs:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        store.load(ref, fingerprint)
        times.append(time.perf_counter() - start)
    return times


def adapter_load(local: AdapterStore, run: Path, base: str, repeats: int, work: Path) -> dict:
    from hub.store.backends import open_store
    from tests.s3_server import S3Server

    refs = [f"task{i % TASKS}" for i in range(repeats)]
    fingerprint = load_backbone(base, "cpu").fingerprint
    cache = work / "cache"
    with S3Server() as s3:
        s3.create_bucket("adapters")
        remote = open_store("s3://adapters/hub", cache_dir=cache, **s3.storage_options)
        for i in range(TASKS):
            remote.publish(run / "best", name=f"task{i}")
        rows = {"local folder": load_times(local, refs, fingerprint, None),
                "S3 (moto on 127.0.0.1), cold cache": load_times(remote, refs, fingerprint, cache),
                "S3, warm local cache": load_times(remote, refs, fingerprint, None)}
    return {name: {"loads": len(t), "p50_ms": 1000 * statistics.median(t), "max_ms": 1000 * max(t)}
            for name, t in rows.items()}


def main() -> None:
    parser = load_arguments(__doc__, clients=24, seconds=40)
    parser.add_argument("--loads", type=int, default=30, help="adapter loads timed per store")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hub-ray-bench-"))
    local = AdapterStore(work / "store")
    for i in range(TASKS):
        local.publish(args.run / "best", name=f"task{i}")
    result = {"machine": machine(), "cpus": os.cpu_count(), "tasks": TASKS,
              "serving": [serve_with_replicas(work / "store", args.base, r, args.clients, args.seconds, work)
                          for r in (1, 2)],
              "adapter_load": adapter_load(local, args.run, args.base, args.loads, work)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
