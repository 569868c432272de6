"""Load test: 64 concurrent clients over 8 tasks for 60 s against `hub serve` on 127.0.0.1 (bounded, stops itself).

Publishes one trained run under 8 task names into a temporary store, starts `hub serve` on a free loopback
port, and runs closed-loop clients (each sends its next request when the last one is answered) until the
time is up. Every request must get a 200 (or a 429 with Retry-After, which the client honours and retries):
zero 5xx and zero lost requests. Reports throughput and latency percentiles.

    python -m bench.load_test --base ../shared/models/gpt2-standin --run .demo/run --out docs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.common import machine, percentile
from hub.store.local import AdapterStore

INPUTS = [
    "name[The Eagle], eatType[coffee shop], food[French]",
    "name[Alimentum], area[city centre], familyFriendly[no]",
    "name[Blue Spice], priceRange[cheap], near[Rainbow Vegetarian Café]",
    "name[The Mill], customer rating[5 out of 5], area[riverside]",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client(http: httpx.AsyncClient, index: int, deadline: float, tasks: list[str], stats: dict) -> None:
    n = 0
    while time.monotonic() < deadline:
        body = {"task": tasks[(index + n) % len(tasks)], "input": INPUTS[n % len(INPUTS)], "max_new_tokens": 24}
        start = time.monotonic()
        while True:
            response = await http.post("/v1/generate", json=body)
            stats["status"][response.status_code] += 1
            if response.status_code != 429:
                break
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
        if response.status_code == 200:
            stats["latencies"].append(time.monotonic() - start)
            stats["tokens"] += response.json()["usage"]["completion_tokens"]
        n += 1
    stats["sent"] += n


async def load(url: str, clients: int, seconds: float, tasks: list[str]) -> dict:
    stats = {"status": Counter(), "latencies": [], "tokens": 0, "sent": 0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(http, i, start + seconds, tasks, stats) for i in range(clients)))
        stats["wall"] = time.monotonic() - start
    return stats


def start_server(store: Path, base: str, port: int, log: Path, extra: list[str] = (),
                 ready_timeout_s: float = 120) -> subprocess.Popen:
    command = [sys.executable, "-m", "hub", "serve", "--store", str(store), "--base", base, "--device", "cpu",
               "--port", str(port), "--max-batch", "32", *extra]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(int(ready_timeout_s * 2)):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    server.kill()
    raise SystemExit("server did not become ready")


def load_arguments(doc: str, clients: int, seconds: float) -> argparse.ArgumentParser:
    """The options of a load benchmark: backbone, trained run, closed-loop clients, duration, output folder."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--run", type=Path, required=True, help="a trained e2e run (its best/ is published)")
    parser.add_argument("--clients", type=int, default=clients)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    return parser


def main() -> None:
    parser = load_arguments(__doc__, clients=64, seconds=60)
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hub-load-"))
    store = AdapterStore(work / "store")
    tasks = [store.publish(args.run / "best", name=f"task{i}").name for i in range(args.tasks)]
    port = free_port()
    server = start_server(work / "store", args.base, port, work / "server.log")
    try:
        stats = asyncio.run(load(f"http://127.0.0.1:{port}", args.clients, args.seconds, tasks))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    answered = len(stats["latencies"])
    errors = sum(v for k, v in stats["status"].items() if k >= 500)
    result = {"machine": machine(), "clients": args.clients, "tasks": args.tasks, "seconds": stats["wall"],
              "requests": stats["sent"], "answered_200": answered, "lost": stats["sent"] - answered,
              "status_counts": dict(stats["status"]), "server_errors_5xx": errors,
              "requests_per_s": answered / stats["wall"], "tokens_per_s": stats["tokens"] / stats["wall"],
              "latency_p50_s": percentile(stats["latencies"], 50), "latency_p90_s": percentile(stats["latencies"], 90),
              "latency_p99_s": percentile(stats["latencies"], 99), "server_exit_code": server.returncode}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_test.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if errors or result["lost"]:
        raise SystemExit(f"FAILED: {errors} server errors, {result['lost']} lost requests")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
