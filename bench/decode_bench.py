"""Decode-heavy serving benchmark of engine v2 (issue 8), one run, every ratio side by side.

A random `GPT2Config()` (124 M) with the real GPT-2 tokenizer; 64 concurrent requests, prompts of 16 tokens,
64 new tokens each (`ignore_eos`, so every scenario decodes the same tokens), greedy. Scenarios:

  single    64 rows, one task, b=100
  distinct  64 rows, 64 distinct tasks, b=100
  cycling   64 rows, 64 distinct tasks, b cycling 10 / 100 / 300 (E2E, persona, translation sizes)
  base      64 rows, the frozen base, no adapter
  single+300  `single` while b=300 adapters are resident as well

Each round runs `single` with only b=100 adapters resident, then adds the b=10/300 ones and runs the others; the
best of the rounds is kept. Also measured: the bank's bytes against the adapters' own, RSS, HTTP vs the engine
(64 concurrent `/v1/generate` to `hub serve` in its own process over 8 tasks, against `decode_to_completion` of the same
requests here), and publish -> first served request through the store watcher.

    python -m bench.decode_bench --out docs     # docs/decode_bench.json and .md (the tables of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch

from bench.common import machine, percentile, random_adapter, random_gpt2_small, timed_run, write_export
from bench.load_test import free_port
from hub.serving.tiers import ManagerSettings
from hub.model.backbone import load_backbone
from hub.serving.composition import Composition, resolve_composition
from hub.serving.engine import Engine
from hub.serving.sampling import sampling_params
from hub.serving.service import HubService, ServiceSettings
from hub.store.local import AdapterStore
from tasks import make_task

ROWS, PROMPT_TOKENS, NEW_TOKENS = 64, 16, 64
TASK_TYPE = "text2text"


def prompt_sources(tokenizer, count: int) -> list[str]:
    """Distinct sources whose prompt (BOS, source marker, text, target marker) is PROMPT_TOKENS tokens."""
    words = "the a cat dog sat on mat ran fast slow house tree river city green blue small large old new".split()
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40)) for i in range(count)]
    return [tokenizer.decode(tokenizer.encode(" " + t)[: PROMPT_TOKENS - 3]) for t in texts]


def run_engine(engine: Engine, tasks: list[str | None], sources: list[str], block: str | None = None) -> dict:
    """Decode one row per source; with `block` ("average" or "stack"), row i composes tasks i and i + 1."""
    params = sampling_params(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    composed = [None] * len(tasks) if block is None else [
        resolve_composition(Composition.build(block, [tasks[i], tasks[(i + 1) % len(tasks)]]), engine.manager.resolve,
                            None) for i in range(len(tasks))]
    sequences = [engine.new_sequence(t, s, params, prompt_text=s, composed=c)
                 for t, s, c in zip(tasks, sources, composed)]
    wall, latencies = timed_run(engine, sequences)
    tokens = sum(len(s.output_ids) for s in sequences)
    return {"tokens": tokens, "outputs": [s.output_ids for s in sequences], "seconds": wall, "tokens_per_s": tokens / wall, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "peak_rss_gb": peak_rss_gb()}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def rss_gb() -> float:
    return psutil.Process().memory_info().rss / 1e9


def adapter_bytes(adapters) -> int:
    return sum(t.numel() * t.element_size() for a in adapters for t in a.adapter_tensors.values())


def scenario_adapters(config) -> tuple[list, list]:
    """64 adapters at b=100, and 64 whose bottlenecks cycle 10 / 100 / 300."""
    k = len(make_task(TASK_TYPE).special_tokens)
    b100 = [random_adapter(f"h{i}", config, 100, TASK_TYPE, k, seed=i) for i in range(ROWS)]
    cycling = [random_adapter(f"m{i}", config, (10, 100, 300)[i % 3], TASK_TYPE, k, seed=1000 + i) for i in range(ROWS)]
    return b100, cycling


def engine_scenarios(folder: Path, rounds: int) -> dict:
    backbone = load_backbone(str(folder), "cpu")
    sources = prompt_sources(backbone.tokenizer, ROWS)
    b100, cycling = scenario_adapters(backbone.model.config)
    scenarios = {"single": ["h0"] * ROWS, "single+300": ["h0"] * ROWS, "distinct": [a.name for a in b100],
                 "cycling": [a.name for a in cycling], "base": [None] * ROWS}
    results: dict[str, dict] = {}
    with Engine(backbone, make_task) as engine:
        for adapter in b100:
            engine.manager.add_adapter(adapter)
        run_engine(engine, scenarios["single"][:8], sources[:8])  # warm-up
        for _ in range(rounds):
            for adapter in cycling:
                engine.manager.remove(adapter.name) if adapter.name in engine.manager.adapters else None
            keep(results, "single", run_engine(engine, scenarios["single"], sources))
            for adapter in cycling:
                engine.manager.add_adapter(adapter)
            for name in ("single+300", "distinct", "cycling", "base"):
                keep(results, name, run_engine(engine, scenarios[name], sources))
            for block in ("average", "stack"):  # every row composes two of the b=100 adapters
                keep(results, f"distinct, {block} of 2", run_engine(engine, scenarios["distinct"], sources, block))
    with Engine(backbone, make_task, ManagerSettings(bank_dtype=torch.float16)) as engine:  # `hub serve --bank-dtype float16`
        for adapter in b100 + cycling:
            engine.manager.add_adapter(adapter)
        for _ in range(rounds):
            for name in ("distinct", "cycling"):
                keep(results, f"{name}, float16 bank", run_engine(engine, scenarios[name], sources))
    for name in ("distinct", "cycling"):  # greedy agreement of the float16 bank with the float32 one
        half = results[f"{name}, float16 bank"]
        half["identical_outputs"] = statistics.mean(a == b for a, b in zip(half["outputs"], results[name]["outputs"]))
    return without_outputs(results)


def without_outputs(results: dict[str, dict]) -> dict[str, dict]:
    """The results without the decoded token ids (kept only to compare runs)."""
    return {name: {k: v for k, v in result.items() if k != "outputs"} for name, result in results.items()}


def bank_memory(folder: Path) -> dict:
    """The bank's bytes with both adapter sets resident, against the adapters' own bytes."""
    backbone = load_backbone(str(folder), "cpu")
    b100, cycling = scenario_adapters(backbone.model.config)
    with Engine(backbone, make_task) as engine:
        for adapter in b100 + cycling:
            engine.manager.add_adapter(adapter)
        return {"bank_bytes": engine.manager.resident_bytes(), "adapter_bytes": adapter_bytes(b100 + cycling),
                "resident_adapters": engine.manager.resident_count(), "rss_gb_all_resident": rss_gb()}


class PassThrough(torch.nn.Module):
    """A block that returns its input as GPT-2's blocks return their output: a tuple."""

    def forward(self, h):
        return (h,)


class PassThroughBlocks(torch.nn.Module):
    """GPT-2's block list with blocks that return their input: what is left to time is the adapter hooks."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = torch.nn.Module()
        self.transformer.h = torch.nn.ModuleList(PassThrough() for _ in range(config.n_layer))
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, h):
        for block in self.transformer.h:
            block(h)


def hook_times(folder: Path, repeats: int = 5) -> dict:
    """Milliseconds per decode step (every layer, ROWS rows of one token) spent in the VLM hooks alone, the bytes
    of adapter weights that step reads, and the machine's read bandwidth: the floor those bytes set. The
    distinct and cycling plans also run as two dense `F.linear` calls per adapter and layer (`dense`: no rank
    buckets), the form before `F.embedding_bag`, to show what the buckets save."""
    from transformers import GPT2Config

    from hub.adapters.base import RowState
    from hub.adapters.vlm import VlmRuntime, stack_layers
    from hub.adapters.vlm_plan import group_rows
    from hub.adapters.vlm_format import adapter_layers

    config = GPT2Config.from_pretrained(folder)
    model, (b100, cycling) = PassThroughBlocks(config), scenario_adapters(config)
    h, times, read = torch.randn(ROWS, 1, config.n_embd), {}, {}
    for bank_dtype in (torch.float32, torch.float16):
        runtime = VlmRuntime(model, bank_dtype)
        slots = {a.name: runtime.add(stack_layers(adapter_layers(a.adapter_tensors, a.name))) for a in b100 + cycling}
        rows = {"single": [slots["h0"]] * ROWS, "distinct": [slots[a.name] for a in b100],
                "cycling": [slots[a.name] for a in cycling]}
        plans = {name: runtime.make_plan([RowState(s) for s in row_slots]) for name, row_slots in rows.items()}
        if bank_dtype == torch.float32:
            for name in ("distinct", "cycling"):
                plans[f"{name}, dense"] = group_rows([RowState(s) for s in rows[name]], 0, runtime.device)
        else:
            plans = {f"{name}, float16 bank": plans[name] for name in ("distinct", "cycling")}
        for name, plan in plans.items():
            with torch.inference_mode(), runtime.active(plan):
                model(h)
                times[name] = best_ms(lambda: model(h), repeats)
            read[name] = sum(bank_dtype.itemsize * runtime.layer_weights(s, layer).nbytes() // 4
                             for s in set(rows[name.split(",")[0]]) for layer in range(config.n_layer))
        runtime.close()
    return {"ms": times, "bytes_read": read, "read_gb_s": read_bandwidth_gb_s()}


def best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def read_bandwidth_gb_s(megabytes: int = 512) -> float:
    """Reading a tensor far larger than the caches (a sum over it), with torch's threads: bytes / second."""
    data = torch.ones(megabytes * 2**20 // 4)
    return data.numel() * 4 / best_ms(data.sum, 5) / 1e6


def keep(results: dict, name: str, result: dict) -> None:
    """The fastest round (the least disturbed by other load on the machine)."""
    if name not in results or result["tokens_per_s"] > results[name]["tokens_per_s"]:
        results[name] = result
    print(name, f"{result['tokens_per_s']:.1f} tok/s", flush=True)


# -- HTTP against the engine ----------------------------------------------------------------------------------
def publish_random(store: AdapterStore, folder: Path, names_and_ranks: list[tuple[str, int]], seed: int) -> None:
    backbone = load_backbone(str(folder), "cpu")
    task = make_task(TASK_TYPE)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, rank) in enumerate(names_and_ranks):
            adapter = random_adapter(name, backbone.model.config, rank, TASK_TYPE, len(task.special_tokens), seed + i)
            store.publish(write_export(Path(tmp) / name, adapter, task, backbone.fingerprint))


async def http_load(url: str, tasks: list[str], sources: list[str]) -> dict:
    limits = httpx.Limits(max_connections=len(sources), max_keepalive_connections=len(sources))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, trust_env=False) as http:
        async def one(task, source):
            body = {"task": task, "input": source, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
            response = await http.post("/v1/generate", json=body)
            response.raise_for_status()
            return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        done = await asyncio.gather(*(one(t, s) for t, s in zip(tasks, sources)))
        wall = time.perf_counter() - start
    tokens = sum(n for _, n in done)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "p50_s": percentile([t for t, _ in done], 50), "p99_s": percentile([t for t, _ in done], 99)}


def http_vs_engine(folder: Path, work: Path, rounds: int) -> dict:
    store = AdapterStore(work / "store")
    names = [f"t{i}" for i in range(8)]
    publish_random(store, folder, [(n, 100) for n in names], seed=5000)
    backbone = load_backbone(str(folder), "cpu")
    sources = prompt_sources(backbone.tokenizer, ROWS)
    tasks = [names[i % len(names)] for i in range(ROWS)]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "cli", "serve", "--store", str(store.root), "--base", str(folder),
               "--device", "cpu", "--port", str(port), "--max-batch", str(ROWS), "--watch-interval", "0",
               "--request-timeout", "3600"]
    server = subprocess.Popen(command, env=env, stdout=(work / "server.log").open("w"), stderr=subprocess.STDOUT)
    results: dict[str, dict] = {}
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        with Engine(backbone, make_task) as engine:
            for name in names:
                engine.manager.add_adapter(store.load(name, backbone.fingerprint))
            for _ in range(rounds):
                keep(results, "engine", run_engine(engine, tasks, sources))
                keep(results, "http", asyncio.run(http_load(f"http://127.0.0.1:{port}", tasks, sources)))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    return without_outputs(results)


def http_distinct(folder: Path, work: Path, rounds: int) -> dict:
    """Over HTTP, in one `hub serve`: 64 concurrent requests to one b=100 adapter against 64 to 64 distinct
    b=100 adapters (every adapter resident), alternating, best of `rounds` each."""
    store = AdapterStore(work / "distinct-store")
    names = [f"d{i}" for i in range(ROWS)]
    publish_random(store, folder, [(n, 100) for n in names], seed=9000)
    sources = prompt_sources(load_backbone(str(folder), "cpu").tokenizer, ROWS)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "hub", "serve", "--store", str(store.root), "--base", str(folder),
               "--device", "cpu", "--port", str(port), "--max-batch", str(ROWS), "--watch-interval", "0",
               "--request-timeout", "3600", "--threads", str(torch.get_num_threads())]
    server = subprocess.Popen(command, env=env, stdout=(work / "distinct.log").open("w"), stderr=subprocess.STDOUT)
    results: dict[str, dict] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
        asyncio.run(http_load(url, names, sources))  # warm-up: every adapter made resident once
        for _ in range(rounds):
            keep(results, "single", asyncio.run(http_load(url, [names[0]] * ROWS, sources)))
            keep(results, "distinct", asyncio.run(http_load(url, names, sources)))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    return results


def http_by_threads(folder: Path, work: Path) -> dict:
    """HTTP against the engine with 1 and with 2 torch threads (server and engine alike), one round each: whether
    the server's own threads cost the engine its cores."""
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        (work / f"threads-{threads}").mkdir()
        results[threads] = http_vs_engine(folder, work / f"threads-{threads}", 1)
    return results


def wait_ready(url: str, server: subprocess.Popen) -> None:
    for _ in range(600):
        if server.poll() is not None:
            raise SystemExit("hub serve exited")
        try:
            if httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("hub serve did not become ready")


# -- publish -> served -----------------------------------------------------------------------------------------
def publish_latency(folder: Path, work: Path, count: int) -> dict:
    """Publish `count` versions one after another while a service watches its store; time each until served."""
    backbone = load_backbone(str(folder), "cpu")
    store = AdapterStore(work / "watched")
    service = HubService(backbone, store, make_task, ServiceSettings(watch_interval=0.5))
    task = make_task(TASK_TYPE)
    exports = [write_export(work / "exports" / f"p{i}", random_adapter(
        "p", backbone.model.config, 10, TASK_TYPE, len(task.special_tokens), 9000 + i), task, backbone.fingerprint)
        for i in range(count)]

    async def measure() -> list[float]:
        watcher = asyncio.create_task(service.watch_store())
        await asyncio.sleep(1.0)
        latencies = []
        for export in exports:
            start = time.perf_counter()
            version = (await asyncio.to_thread(store.publish, export)).version
            while getattr(service.engine.manager.adapters.get("p"), "version", None) != version:
                await asyncio.sleep(0.001)
            latencies.append(time.perf_counter() - start)
        watcher.cancel()
        return latencies

    latencies = asyncio.run(measure())
    with_inotify = True
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        with_inotify = False
    return {"count": count, "inotify": with_inotify, "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99), "max_ms": 1000 * max(latencies)}


# -- 1,000 stored, 256 resident ---------------------------------------------------------------------------------
SCALE_STORED, SCALE_RESIDENT, SCALE_RANKS = 1000, 256, (10, 100, 300)


def scale(folder: Path, work: Path, store_dir: Path | None = None) -> dict:
    """`hub serve --max-resident 256 --max-cpu-adapters 256` over a store of 1,000 adapters of mixed bottleneck:
    start-up (listing and validating the store, registering every adapter from its metadata), RSS, making 256
    resident through requests, and the latency of a one-token request whose adapter is in neither tier.
    `store_dir` keeps the store between runs (it is built there when it does not hold the adapters yet)."""
    store = AdapterStore(store_dir or work / "scale-store")
    if sum(1 for p in store.root.glob("*/*/hub.json")) != SCALE_STORED:
        started = time.perf_counter()
        publish_random(store, folder, [(f"s{i}", SCALE_RANKS[i % 3]) for i in range(SCALE_STORED)], seed=20000)
        print(f"scale: store of {SCALE_STORED} written in {time.perf_counter() - started:.0f}s", flush=True)
    stored_bytes = sum(f.stat().st_size for f in store.root.rglob("*.safetensors"))
    os.sync()
    store = AdapterStore(store.root)  # a fresh object: nothing validated yet, as in a starting server
    backbone = load_backbone(str(folder), "cpu")
    sources = prompt_sources(backbone.tokenizer, 1)
    settings = ServiceSettings(max_batch=ROWS, max_resident=SCALE_RESIDENT, max_cpu_adapters=SCALE_RESIDENT,
                               watch_interval=0, request_timeout=3600)
    rss_before = rss_gb()

    async def measure() -> dict:
        begin = time.perf_counter()
        service = HubService(backbone, store, make_task, settings)
        await service.start()
        startup = time.perf_counter() - begin
        rss_started = rss_gb()

        async def one(name: str) -> float:
            start = time.perf_counter()
            handle = await service.submit(name, sources[0], sampling_params(max_new_tokens=1, ignore_eos=True))
            await service.complete(handle, lambda: asyncio.sleep(0, False))
            return time.perf_counter() - start

        begin = time.perf_counter()
        for batch in range(0, SCALE_RESIDENT, ROWS):  # 256 adapters made resident by requests, 64 at a time
            await asyncio.gather(*(one(f"s{i}") for i in range(batch, batch + ROWS)))
        fill = time.perf_counter() - begin
        resident = {"rss_gb": rss_gb(), "bank_bytes": service.engine.manager.resident_bytes(),
                    "resident": service.engine.manager.resident_count(), "seconds": fill}
        warm_ids = range(max(0, SCALE_RESIDENT - 30), SCALE_RESIDENT)  # resident: the last ones made so
        cold_ids = range(SCALE_STORED - min(30, SCALE_STORED - SCALE_RESIDENT), SCALE_STORED)  # never read yet
        warm = {r: [await one(f"s{i}") for i in warm_ids if i % 3 == k] for k, r in enumerate(SCALE_RANKS)}
        cold = {r: [await one(f"s{i}") for i in cold_ids if i % 3 == k] for k, r in enumerate(SCALE_RANKS)}
        service.stop()
        return {"startup_s": startup, "rss_gb_started": rss_started, "resident_256": resident,
                "rss_gb_end": rss_gb(),
                "resident_request_ms": {r: 1000 * statistics.median(v) for r, v in warm.items()},
                "cold_request_ms": {r: 1000 * statistics.median(v) for r, v in cold.items()},
                "cold_request_ms_max": {r: 1000 * max(v) for r, v in cold.items()}}

    return {"stored": SCALE_STORED, "stored_bytes": stored_bytes, "rss_gb_backbone": rss_before,
            **asyncio.run(measure())}


LABELS = {"single": "single task, b=100", "distinct": "64 distinct tasks, b=100",
          "cycling": "64 distinct tasks, b cycling 10/100/300", "base": "frozen base, no adapter",
          "single+300": "single task b=100, b=300 adapters resident too",
          "distinct, float16 bank": "64 distinct tasks, b=100, `--bank-dtype float16`",
          "cycling, float16 bank": "64 distinct tasks, b cycling 10/100/300, `--bank-dtype float16`",
          "distinct, average of 2": "64 rows, each Average of 2 distinct b=100 adapters (compose)",
          "distinct, stack of 2": "64 rows, each Stack of 2 distinct b=100 adapters (compose)"}
TARGETS = [("distinct", "single", 0.95), ("cycling", "single", 0.95), ("single+300", "single", 0.97),
           ("distinct, float16 bank", "single", 0.95), ("cycling, float16 bank", "single", 0.95),
           ("single", "base", None), ("distinct", "base", None), ("cycling", "base", None),
           ("distinct, average of 2", "distinct", None), ("distinct, stack of 2", "distinct", None)]


def hooks_lines(hooks: dict) -> list[str]:
    bandwidth = hooks["read_gb_s"]
    lines = [f"VLM hooks alone, one decode step of {ROWS} rows (machine read bandwidth {bandwidth:.1f} GB/s):", "",
             "| plan | ms per step | adapter bytes read (MB) | bytes / bandwidth (ms) |", "|---|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {hooks['bytes_read'][name] / 1e6:.0f} | "
              f"{hooks['bytes_read'][name] / bandwidth / 1e6:.1f} |" for name, ms in hooks["ms"].items()]
    return lines


def scale_lines(scale: dict) -> list[str]:
    resident = scale["resident_256"]

    def per_rank(values: dict) -> str:
        return ", ".join(f"b={r} {ms:.0f} ms" for r, ms in values.items())

    return [f"{scale['stored']} adapters in the store ({scale['stored_bytes'] / 1e9:.1f} GB, b cycling 10/100/300), "
            f"`--max-resident {resident['resident']} --max-cpu-adapters {resident['resident']}`: start-up "
            f"{scale['startup_s']:.1f} s (RSS {scale['rss_gb_started']:.2f} GB, backbone alone "
            f"{scale['rss_gb_backbone']:.2f} GB); {resident['resident']} made resident by requests in "
            f"{resident['seconds']:.1f} s (RSS {resident['rss_gb']:.2f} GB, bank {resident['bank_bytes'] / 1e9:.2f} GB); "
            f"a one-token request, median: resident adapter {per_rank(scale['resident_request_ms'])}; adapter in "
            f"neither tier (read from the store) {per_rank(scale['cold_request_ms'])} "
            f"(max {per_rank(scale['cold_request_ms_max'])})."]


def markdown(result: dict) -> str:
    """The tables of docs/BENCHMARKS.md from a decode_bench.json."""
    runs, memory = result.get("scenarios", {}), result.get("memory")
    lines_hooks = hooks_lines(result["hooks"]) if "hooks" in result else []
    lines = ["| scenario | generated tokens/s | p50 latency (s) | p99 latency (s) | peak RSS so far (GB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {LABELS[k]} | {r['tokens_per_s']:.1f} | {r['p50_s']:.1f} | {r['p99_s']:.1f} | {r['peak_rss_gb']:.2f} |"
              for k, r in runs.items()]
    lines += ["", "| ratio | measured | target | met |", "|---|---|---|---|"]
    for num, den, target in TARGETS if runs else ():
        ratio = runs[num]["tokens_per_s"] / runs[den]["tokens_per_s"]
        met = "(reference)" if target is None else f"≥ {target} | {'yes' if ratio >= target else '**no**'}"
        lines.append(f"| {num} / {den} | {ratio:.2f} | {met} |" + (" |" if target is None else ""))
    agreement = {k: r["identical_outputs"] for k, r in runs.items() if "identical_outputs" in r}
    if agreement:
        lines += ["", "Greedy outputs identical to the float32 bank's: " + ", ".join(
            f"{k} {100 * share:.0f} %" for k, share in agreement.items()) + "."]
    if memory:
        bank, own = memory["bank_bytes"], memory["adapter_bytes"]
        lines += ["", f"Bank: {memory['resident_adapters']} resident adapters (the b=100 set and the 10/100/300 set), "
                  f"{bank / 1e6:.0f} MB on the device against {own / 1e6:.0f} MB of their own weights "
                  f"({bank / own:.2f}×); process RSS {memory['rss_gb_all_resident']:.2f} GB with all of them resident."]
    if "http" in result:
        http, engine = result["http"]["http"], result["http"]["engine"]
        lines += ["", "| 64 concurrent requests over 8 tasks | tokens/s | p50 (s) | p99 (s) |", "|---|---|---|---|",
                  f"| `decode_to_completion` in the bench process | {engine['tokens_per_s']:.1f} | {engine['p50_s']:.1f} | "
                  f"{engine['p99_s']:.1f} |",
                  f"| `/v1/generate` to `hub serve` | {http['tokens_per_s']:.1f} | {http['p50_s']:.1f} | "
                  f"{http['p99_s']:.1f} |",
                  f"| HTTP / engine | {http['tokens_per_s'] / engine['tokens_per_s']:.2f} (target ≥ 0.9) | | |"]
    if "http-distinct" in result:
        single, distinct = result["http-distinct"]["single"], result["http-distinct"]["distinct"]
        lines += ["", "| 64 concurrent `/v1/generate` to `hub serve` | tokens/s | p50 (s) | p99 (s) |", "|---|---|---|---|",
                  *[f"| {label} | {r['tokens_per_s']:.1f} | {r['p50_s']:.1f} | {r['p99_s']:.1f} |"
                    for label, r in (("one adapter, b=100", single), ("64 distinct adapters, b=100", distinct))],
                  f"| distinct / single | {distinct['tokens_per_s'] / single['tokens_per_s']:.2f} (target ≥ 0.9) | | |"]
    lines += [""] + lines_hooks if lines_hooks else []
    lines += [""] + scale_lines(result["scale"]) if "scale" in result else []
    if "publish" in result:
        publish = result["publish"]
        lines += ["", f"Publish -> served ({publish['count']} publishes, store watched "
                  f"{'with inotify' if publish['inotify'] else 'by polling'}): p50 {publish['p50_ms']:.0f} ms, "
                  f"p99 {publish['p99_ms']:.0f} ms (target p99 ≤ 100 ms)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    global ROWS, NEW_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="memory,scenarios,hooks,http,publish",
                        help="comma-separated: memory, scenarios, hooks, http, publish, scale, http-threads, "
                        "http-distinct")
    parser.add_argument("--rows", type=int, default=ROWS, help="smaller for a quick check of the script")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--scale-store", type=Path, help="scale part: keep its 1,000-adapter store here")
    args = parser.parse_args()
    ROWS, NEW_TOKENS = args.rows, args.new_tokens
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="hub-decode-bench-"))
    folder = random_gpt2_small(work / "gpt2-random")
    parts = {"memory": lambda: bank_memory(folder), "hooks": lambda: hook_times(folder), "scenarios": lambda: engine_scenarios(folder, args.rounds),
             "http": lambda: http_vs_engine(folder, work, args.rounds), "publish": lambda: publish_latency(folder, work, 20),
             "scale": lambda: scale(folder, work, args.scale_store),
             "http-threads": lambda: http_by_threads(folder, work),
             "http-distinct": lambda: http_distinct(folder, work, args.rounds)}
    result = {"machine": machine(), "load_before": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    for part in args.parts.split(","):
        result[part] = parts[part]()
        result["load_after"] = os.getloadavg()
        (args.out / "decode_bench.json").write_text(json.dumps(result, indent=1, default=str))  # measured so far
    (args.out / "decode_bench.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
