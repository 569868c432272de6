"""Production-traffic benchmark: S-LoRA's workload scaled to this CPU, over HTTP against `hub serve`, one run.

A random `GPT2Config()` (124 M) with the real GPT-2 tokenizer; VLM adapters of bottleneck 10 / 100 / 300 in turn.
One seeded trace for every configuration: Poisson arrivals at `--rate` requests/s for `--duration` s, each request's
adapter drawn with Zipf(α = 1) popularity over the configuration's N adapters, prompt and output lengths uniform
in 8-128 tokens (outputs fixed with `ignore_eos`), streamed (`stream: true`). `--max-resident` is below N so the
tiers work; the CPU tier (`--max-cpu-adapters`) holds the hot set. Configurations: N = 5, 100, 1,000 on a local
store and N = 100 on S3 (moto on 127.0.0.1). Reported per configuration: throughput (generated tokens/s, first
arrival to last answer), TTFT and mean inter-token latency p50/p99, SLO attainment, cold loads (the server's
/metrics), /healthz latency every 100 ms during the run, peak RSS of the server.

The cold-load probe: one stream decodes while 64 requests for 64 adapters in no tier arrive at once; its
inter-token gaps against their median, and /healthz meanwhile.

    python -m bench.trace_bench --out docs        # docs/trace_bench.json and .md (the tables in BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.common import machine, percentile, random_gpt2_small
from bench.decode_bench import publish_random
from bench.load_test import free_port
from hub.store.backends import open_store

RANKS = (10, 100, 300)
SLO_TTFT_S, SLO_ITL_S = 5.0, 0.5  # a request meets the SLO when both hold (chosen for this 2-core CPU)
HEALTH_EVERY_S = 0.1


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    rank: int  # popularity rank: adapter `rank % N` of the configuration
    prompt_tokens: int
    new_tokens: int


def make_trace(rate: float, duration: float, seed: int, max_n: int) -> list[Arrival]:
    """Poisson arrivals with Zipf(1) popularity ranks over `max_n` (each configuration folds them onto its N by
    drawing again from its own Zipf: see `zipf_pick`), lengths uniform in 8..128."""
    rng = random.Random(seed)
    arrivals, now = [], 0.0
    while True:
        now += rng.expovariate(rate)
        if now > duration:
            return arrivals
        arrivals.append(Arrival(now, rng.randrange(1 << 30), rng.randint(8, 128), rng.randint(8, 128)))


def zipf_pick(key: int, n: int) -> int:
    """The adapter of popularity rank r in 0..n-1 with P(r) ∝ 1/(r+1), drawn from `key` (deterministic)."""
    weights = [1.0 / (r + 1) for r in range(n)]
    return random.Random(key).choices(range(n), weights)[0]


def source_of(tokenizer, tokens: int, key: int) -> str:
    """A text of about `tokens` tokens (prompt = BOS + markers + text)."""
    words = "the a cat dog sat on mat ran fast slow house tree river city green blue small large old new".split()
    rng = random.Random(key)
    ids = tokenizer.encode(" " + " ".join(rng.choice(words) for _ in range(tokens + 8)))
    return tokenizer.decode(ids[: max(1, tokens - 3)])


@dataclass
class Outcome:
    status: int
    ttft: float | None = None
    itl: float | None = None  # mean seconds between tokens after the first
    gaps: list[float] = field(default_factory=list)  # between the stream's events
    tokens: int = 0
    done_at: float = 0.0


async def one_request(http: httpx.AsyncClient, task: str, source: str, new_tokens: int) -> Outcome:
    body = {"task": task, "input": source, "max_new_tokens": new_tokens, "ignore_eos": True, "stream": True}
    sent = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with http.stream("POST", "/v1/generate", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Outcome(response.status_code, done_at=time.perf_counter())
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "text" in event:
                stamps.append(time.perf_counter())
            elif "usage" in event:
                tokens = event["usage"]["completion_tokens"]
            elif "error" in event:
                return Outcome(event["error"].get("code", 500), done_at=time.perf_counter())
    if not stamps:
        return Outcome(200, tokens=tokens, done_at=time.perf_counter())
    itl = (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else 0.0
    return Outcome(200, stamps[0] - sent, itl, [b - a for a, b in zip(stamps, stamps[1:])], tokens, stamps[-1])


async def probe_health(url: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
        while not stop.is_set():
            started = time.perf_counter()
            await http.get("/healthz")
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(HEALTH_EVERY_S)
    return latencies


async def watch_rss(pid: int, stop: asyncio.Event) -> float:
    process, peak = psutil.Process(pid), 0.0
    while not stop.is_set():
        peak = max(peak, process.memory_info().rss / 1e9)
        await asyncio.sleep(0.5)
    return peak


def adapter_loads(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30, trust_env=False).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("hub_adapter_loads "))


async def replay(url: str, pid: int, trace: list[Arrival], n: int, tokenizer) -> dict:
    limits = httpx.Limits(max_connections=len(trace) + 8, max_keepalive_connections=64)
    stop = asyncio.Event()
    health = asyncio.create_task(probe_health(url, stop))
    rss = asyncio.create_task(watch_rss(pid, stop))
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits, trust_env=False) as http:
        start = time.perf_counter()

        async def fire(arrival: Arrival) -> Outcome:
            await asyncio.sleep(max(0.0, start + arrival.at - time.perf_counter()))
            task = f"a{zipf_pick(arrival.rank, n)}"
            return await one_request(http, task, source_of(tokenizer, arrival.prompt_tokens, arrival.rank),
                                     arrival.new_tokens)

        outcomes = await asyncio.gather(*(fire(a) for a in trace))
    stop.set()
    ok = [o for o in outcomes if o.status == 200 and o.ttft is not None]
    wall = max(o.done_at for o in outcomes) - start
    tokens = sum(o.tokens for o in ok)
    ttft, itl, health_s = [o.ttft for o in ok], [o.itl for o in ok], await health
    return {"requests": len(trace), "ok": len(ok), "statuses": sorted({o.status for o in outcomes}),
            "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "slo_attainment": sum(o.ttft <= SLO_TTFT_S and o.itl <= SLO_ITL_S for o in ok) / len(trace),
            "distinct_adapters": len({zipf_pick(a.rank, n) for a in trace}),
            "healthz_p50_ms": 1000 * percentile(health_s, 50), "healthz_p99_ms": 1000 * percentile(health_s, 99),
            "peak_rss_gb": await rss}


def start_server(store: str, base: Path, options: list[str], log: Path, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "hub", "serve", "--store", store, "--base", str(base), "--device", "cpu",
               "--port", str(port), "--watch-interval", "0", "--request-timeout", "3600", *options]
    server = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if server.poll() is not None:
            raise SystemExit(f"hub serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("hub serve did not become ready in 10 minutes")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()


def ensure_store(store_url: str, base: Path, n: int, storage: dict) -> None:
    """A store holding adapters a0..a{n-1} (bottlenecks 10/100/300 in turn); kept between runs."""
    store = open_store(store_url, **storage)
    have = {s.name for s in store.list() if s.versions}
    missing = [(f"a{i}", RANKS[i % 3]) for i in range(n) if f"a{i}" not in have]
    if missing:
        started = time.perf_counter()
        publish_random(store, base, missing, seed=30000 + len(have))
        print(f"store {store_url}: {len(missing)} adapters published in {time.perf_counter() - started:.0f}s",
              flush=True)


@dataclass(frozen=True)
class Setting:
    name: str
    n: int
    store: str  # "local" or "s3"


async def cold_probe(url: str, n: int, tokenizer) -> dict:
    """One stream decodes while 64 requests for 64 adapters in no tier arrive together."""
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=3600, trust_env=False,
                                 limits=httpx.Limits(max_connections=80)) as http:
        stream = asyncio.create_task(one_request(http, "a0", source_of(tokenizer, 16, 1), 200))
        await asyncio.sleep(3.0)  # the stream is decoding (its gaps before the burst are its baseline)
        health = asyncio.create_task(probe_health(url, stop))
        cold = [one_request(http, f"a{n - 1 - i}", source_of(tokenizer, 8, i), 1) for i in range(64)]
        answers = await asyncio.gather(*cold)
        stop.set()
        streamed = await stream
    gaps = streamed.gaps
    health_s = await health
    return {"cold_requests": len(answers), "cold_ok": sum(a.status == 200 for a in answers),
            "cold_ttft_p50_s": percentile([a.ttft for a in answers if a.ttft], 50),
            "stream_gap_median_ms": 1000 * statistics.median(gaps), "stream_gap_max_ms": 1000 * max(gaps),
            "healthz_p50_ms": 1000 * percentile(health_s, 50), "healthz_p99_ms": 1000 * percentile(health_s, 99)}


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from tests.s3_server import S3Server

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = work / "gpt2-random"
    if not (base / "config.json").exists():
        random_gpt2_small(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    trace = make_trace(args.rate, args.duration, args.seed, max(args.sizes))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HUB_CACHE": str(work / "hub-cache")}
    options = ["--max-batch", str(args.max_batch), "--max-resident", str(args.max_resident),
               "--max-cpu-adapters", str(args.max_cpu), "--threads", str(args.threads), "--admission", args.admission]
    settings = [Setting(f"N={n} local", n, "local") for n in args.sizes]
    settings += [Setting(f"N={n} s3", n, "s3") for n in args.s3_sizes]
    results: dict = {"machine": machine(), "trace": {"requests": len(trace), "rate": args.rate,
                                                    "duration_s": args.duration, "seed": args.seed},
                     "server": options, "slo": {"ttft_s": SLO_TTFT_S, "itl_s": SLO_ITL_S}, "runs": {}}
    with S3Server() as s3:
        s3.create_bucket("trace")
        for setting in settings:
            store, storage = (str(work / "store"), {}) if setting.store == "local" else \
                ("s3://trace/adapters", s3.storage_options)
            ensure_store(store, base, setting.n if setting.store == "s3" else max(args.sizes), storage)
            server_env = {**env, **(s3.environment if setting.store == "s3" else {})}
            server, url = start_server(store, base, options, work / f"{setting.name}.log".replace(" ", "_"),
                                       server_env)
            try:
                before = adapter_loads(url)
                result = asyncio.run(replay(url, server.pid, trace, setting.n, tokenizer))
                result["cold_loads"] = adapter_loads(url) - before
                if setting.n >= 64 and not args.no_probe:
                    result["cold_probe"] = asyncio.run(cold_probe(url, setting.n, tokenizer))
            finally:
                stop_server(server)
            results["runs"][setting.name] = result
            print(setting.name, json.dumps(result), flush=True)
    return results


def markdown(results: dict) -> str:
    runs = results["runs"]
    first = next(iter(runs.values()))["tokens_per_s"]
    lines = [f"Trace: {results['trace']['requests']} requests, Poisson {results['trace']['rate']} req/s for "
             f"{results['trace']['duration_s']} s, Zipf(1) over N adapters, prompts and outputs 8-128 tokens; "
             f"server `{' '.join(results['server'])}`; SLO: TTFT ≤ {SLO_TTFT_S:g} s and mean inter-token "
             f"≤ {SLO_ITL_S:g} s. {results['machine']}.", "",
             "| configuration | distinct adapters used | ok / sent | tokens/s | × first | TTFT p50 / p99 s | "
             "inter-token p50 / p99 ms | SLO met | cold loads | /healthz p50 / p99 ms | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['distinct_adapters']} | {r['ok']} / {r['requests']} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / first:.2f} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                     f"{1000 * r['itl_p50_s']:.0f} / {1000 * r['itl_p99_s']:.0f} | {100 * r['slo_attainment']:.0f} % | "
                     f"{r['cold_loads']:.0f} | {r['healthz_p50_ms']:.1f} / {r['healthz_p99_ms']:.1f} | "
                     f"{r['peak_rss_gb']:.2f} |")
    probes = {name: r["cold_probe"] for name, r in runs.items() if "cold_probe" in r}
    if probes:
        lines += ["", "Cold-load probe: one stream decoding while 64 requests for 64 adapters in no tier arrive "
                      "together.", "",
                  "| configuration | cold answered | cold TTFT p50 s | stream gap median / max ms | "
                  "/healthz p50 / p99 ms |", "|---|---|---|---|---|"]
        for name, p in probes.items():
            lines.append(f"| {name} | {p['cold_ok']} / {p['cold_requests']} | {p['cold_ttft_p50_s']:.2f} | "
                         f"{p['stream_gap_median_ms']:.0f} / {p['stream_gap_max_ms']:.0f} | "
                         f"{p['healthz_p50_ms']:.1f} / {p['healthz_p99_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 100, 1000], help="N on the local store")
    parser.add_argument("--s3-sizes", type=int, nargs="*", default=[100], help="N on S3 (moto)")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second (above capacity: saturated)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-resident", type=int, default=10)
    parser.add_argument("--max-cpu", type=int, default=40, help="--max-cpu-adapters (the hot set)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--admission", default="fair", help="the server's --admission (fair or fcfs)")
    parser.add_argument("--no-probe", action="store_true", help="skip the cold-load probe")
    parser.add_argument("--work", default="/tmp/hub-trace-bench", help="kept between runs (stores, the model)")
    parser.add_argument("--out", type=Path, default=None, help="write trace_bench.json and .md here")
    args = parser.parse_args()
    results = run(args)
    text = markdown(results)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "trace_bench.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "trace_bench.md").write_text(text)


if __name__ == "__main__":
    main()
