"""GuideLLM, an outside benchmark client, against `hub serve` unchanged (`make bench-guidellm`).

A random `GPT2Config()` (124 M) with the real GPT-2 tokenizer serves `--adapters` VLM adapters (bottleneck 100); GuideLLM
(its own virtual environment: `GUIDELLM`, default `.venv-guidellm/bin/guidellm`) runs its OpenAI HTTP backend with
backend validation on (`GET /health`, `/v1/models`), text completions against one adapter (`model` is the task name),
synthetic prompts, a constant request rate for `--seconds`. Its JSON report is kept beside ours, and the summary
(requests by outcome, output tokens/s, TTFT and inter-token latency) goes into docs/guidellm.md.

    python -m bench.guidellm_bench --out docs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from bench.common import machine, random_gpt2_small
from bench.decode_bench import publish_random
from bench.trace_bench import start_server, stop_server
from hub.store.local import AdapterStore

ROOT = Path(__file__).resolve().parents[1]


def guidellm_command(guidellm: str, url: str, model: str, tokenizer: Path, rate: float, seconds: float,
                     prompt_tokens: int, output_tokens: int, report: Path,
                     request_format: str | None = "/v1/completions") -> list[str]:
    """GuideLLM's command line; `request_format` None leaves GuideLLM's default (chat completions)."""
    backend = f"kind=openai_http,target={url},model={model}"
    return [guidellm, "run",
            "--backend", backend + (f",request_format={request_format}" if request_format else ""),
            "--profile", f"kind=constant,rate={rate}",
            "--constraint", f"kind=max_duration,seconds={seconds}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
            "--tokenizer", f"kind=hf_auto,model={tokenizer}",
            "--output", f"kind=json,path={report}", "--disable-console-interactive"]


def summary(report: dict) -> dict:
    """The figures a reader compares with our own benchmark, from GuideLLM's JSON report (its first benchmark)."""
    benchmark = report["benchmarks"][0]
    metrics = benchmark["metrics"]

    def stat(name: str, key: str = "successful") -> dict:
        values = metrics[name][key]
        return {"mean": values.get("mean"), "p50": values.get("median"), "p99": values.get("percentiles", {}).get("p99")}

    totals = metrics["request_totals"]
    return {"successful": totals["successful"], "errored": totals["errored"], "incomplete": totals["incomplete"],
            "output_tokens_per_s": stat("output_tokens_per_second")["mean"],
            "ttft_ms": stat("time_to_first_token_ms"), "itl_ms": stat("inter_token_latency_ms"),
            "request_latency_s": stat("request_latency")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guidellm", default=os.environ.get("GUIDELLM", str(ROOT / ".venv-guidellm/bin/guidellm")))
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base", type=Path, default=None, help="a GPT-2 folder (default: a random GPT2Config())")
    parser.add_argument("--out", type=Path, default=None, help="write guidellm.json and guidellm.md here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hub-guidellm-") as tmp:
        work = Path(tmp)
        base = args.base or random_gpt2_small(work / "gpt2-random")
        store = AdapterStore(work / "store")
        publish_random(store, base, [(f"a{i}", 100) for i in range(args.adapters)], seed=40000)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server, url = start_server(str(store.root), base, ["--threads", str(args.threads)], work / "serve.log", env)
        report_path = work / "report.json"
        try:
            command = guidellm_command(args.guidellm, url, "a0", base, args.rate, args.seconds, args.prompt_tokens,
                                       args.output_tokens, report_path)
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        finally:
            stop_server(server)
        report = json.loads(report_path.read_text())
    result = {"machine": machine(), "command": " ".join(command[1:]), "summary": summary(report)}
    text = markdown(result, args)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "guidellm.json").write_text(json.dumps({**result, "report": report}, indent=1) + "\n")
        (args.out / "guidellm.md").write_text(text)


def markdown(result: dict, args: argparse.Namespace) -> str:
    s = result["summary"]
    return "\n".join([
        f"GuideLLM 0.8.1 (`guidellm run`, OpenAI HTTP backend, backend validation on) against `hub serve`, "
        f"text completions to adapter `a0` of {args.adapters} (b=100, on {args.base or 'a random GPT2Config(), 124 M'}), "
        f"synthetic prompts "
        f"of {args.prompt_tokens} tokens, {args.output_tokens} output tokens, constant {args.rate:g} req/s for "
        f"{args.seconds:g} s. {result['machine']}.", "",
        "| successful | errored | incomplete | output tokens/s | TTFT mean / p50 / p99 ms | "
        "inter-token mean / p50 / p99 ms | request latency p50 / p99 s |",
        "|---|---|---|---|---|---|---|",
        f"| {s['successful']} | {s['errored']} | {s['incomplete']} | {s['output_tokens_per_s']:.1f} | "
        f"{_triple(s['ttft_ms'])} | {_triple(s['itl_ms'])} | "
        f"{s['request_latency_s']['p50']:.2f} / {s['request_latency_s']['p99']:.2f} |", ""])


def _triple(stat: dict) -> str:
    return " / ".join(f"{stat[k]:.0f}" if stat[k] is not None else "-" for k in ("mean", "p50", "p99"))


if __name__ == "__main__":
    main()
