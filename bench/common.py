"""Shared by the benchmarks: a random-weight GPT-2 small saved like a real one, and random VLM adapters."""

from __future__ import annotations

import json
import math
import platform
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from hub.adapters.vlm import vlm_adapter_config
from hub.evaluation.metrics.e2e.mteval import NIST_RULE
from hub.serving.batch import decode_to_completion
from hub.store.versions import LoadedAdapter
from hub.store.format import AdapterMeta

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
STALE = "†"


def nist_is_stale(row: dict) -> bool:
    """An E2E row scored before NIST's reference length followed the official Perl (rows record `nist_rule`)."""
    return row.get("nist_rule") != NIST_RULE


def stale_nist_note(rows: list[dict], rerun: str) -> list[str]:
    """The footnote (one line) for NIST cells marked `STALE`, or nothing when every row is current."""
    stale = sorted(r.get("row") or r.get("cell") for r in rows if nist_is_stale(r))
    if not stale:
        return []
    return [f"{STALE} NIST stale in {len(stale)} row(s): scored before the reference length followed "
            f"`mteval-v13a-sig.pl` after e2e-metrics fdfe692 (reference words ÷ (non-empty references ÷ segments), "
            f"issue 18). Their decoded outputs are not in the repository, so they could not be re-scored; "
            f"{rerun} refreshes them. The other metrics are unaffected."]


def random_gpt2_small(folder: Path | None = None, seed: int = 0) -> Path:
    """`GPT2Config()` (124 M, same compute as real GPT-2) with random weights and the real GPT-2 tokenizer."""
    folder = folder or Path(tempfile.mkdtemp(prefix="gpt2-random-"))
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(GPT2_TOKENIZER, model_max_length=1024).save_pretrained(folder)
    return folder


def adapter_key(layer: int, name: str, part: str) -> str:
    return f"transformer.h.{layer}.output_adapters.adapters.{name}.{part}"


def random_adapter(name: str, config: GPT2Config, bottleneck: int, task_type: str, num_rows: int,
                   seed: int) -> LoadedAdapter:
    """An AdapterHub-format VLM adapter with random weights (W_up not zero, so the adapter does work)."""
    g = torch.Generator().manual_seed(seed)
    d, b = config.n_embd, bottleneck
    shapes = {"adapter_down.0.weight": (d,), "adapter_down.0.bias": (d,), "adapter_down.1.weight": (b, d),
              "adapter_down.1.bias": (b,), "adapter_up.weight": (d, b), "adapter_up.bias": (d,)}
    tensors = {adapter_key(i, name, part): torch.randn(shape, generator=g) * 0.02 + (part == "adapter_down.0.weight")
               for i in range(config.n_layer) for part, shape in shapes.items()}
    meta = AdapterMeta.unpublished(name, task_type, tuple(f"<t{i}>" for i in range(max(num_rows, 2))), b)
    return LoadedAdapter(name, "1", meta, None, tensors, torch.randn(num_rows, d, generator=g) * 0.02)


def add_to_adapters_model(model, adapter: LoadedAdapter) -> None:
    """Add the same adapter to a model run by the `adapters` library (for the library baselines)."""
    model.add_adapter(adapter.name, config=vlm_adapter_config(model.config.n_embd, adapter.meta.bottleneck))
    state = model.state_dict()
    with torch.no_grad():
        for key, value in adapter.adapter_tensors.items():
            state[key].copy_(value)


def machine() -> str:
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {threads} torch threads, {gpu}, torch {torch.__version__}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def write_export(folder: Path, adapter: LoadedAdapter, task, fingerprint: dict) -> Path:
    """A random adapter as a trainer's run export (the input of `AdapterStore.publish`)."""
    from safetensors.torch import save_file

    from hub.store import export
    from hub.store.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TOKENS

    def write_payload(tmp: Path) -> None:
        save_file(adapter.adapter_tensors, str(tmp / ADAPTER_WEIGHTS))
        save_file({"rows": adapter.token_rows.contiguous()}, str(tmp / TASK_TOKENS))
        config = {"name": adapter.name, "config": {"architecture": "bottleneck"}}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config))

    params = sum(t.numel() for t in adapter.adapter_tensors.values()) + adapter.token_rows.numel()
    meta = {**adapter.meta.to_dict(), "name": adapter.name, "special_tokens": list(task.special_tokens),
            "eos_token": task.eos, "trainable_params": params, "metrics": {}, "backbone": fingerprint}
    export.write_export(folder, meta, write_payload)
    return folder


def timed_run(engine, sequences: list) -> tuple[float, list[float]]:
    """Decode the sequences together; the wall time and each request's latency (its finish time)."""
    import time

    finished: dict[int, float] = {}
    for s in sequences:
        s.on_update = lambda seq: seq.finished and finished.setdefault(seq.id, time.perf_counter())
    start = time.perf_counter()
    decode_to_completion(engine, sequences)
    return time.perf_counter() - start, [finished[s.id] - start for s in sequences]
