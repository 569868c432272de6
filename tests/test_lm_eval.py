"""lm-evaluation-harness, unchanged (`lm_eval --model local-completions`), scores a small local task
(tests/fixtures/lm_eval: loglikelihood and generate_until) through `hub serve`, and every per-sample number equals
the same computation done in-process with the serving engine.

Needs lm-eval in its own virtual environment (`make lm-eval` makes .venv-lmeval; or set LM_EVAL to the binary);
skipped, saying so, without it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from hub.model.backbone import load_backbone
from hub.serving.batch import decode_to_completion
from hub.serving.engine import Engine
from hub.serving.sampling import sampling_params
from hub.serving.sequence import TokenPrompt
from hub.store.local import AdapterStore
from tasks import make_task
from tests.test_server import publish, start_server

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = Path(os.environ.get("LM_EVAL", ROOT / ".venv-lmeval/bin/lm_eval"))
TASKS = ROOT / "tests/fixtures/lm_eval"
pytestmark = pytest.mark.skipif(not LM_EVAL.is_file(), reason=f"lm-evaluation-harness is not installed at {LM_EVAL} "
                                                               "(`make lm-eval` installs it, or set LM_EVAL)")


def lm_eval(url: str, tokenizer: Path, out: Path) -> dict[str, list[dict]]:
    """Run lm_eval against the server; each task's logged samples."""
    model_args = (f"model=e2e,base_url={url}/v1/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,"
                  "tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=120")
    command = [str(LM_EVAL), "--model", "local-completions", "--model_args", model_args, "--tasks",
               "hub_local_ll,hub_local_gen", "--include_path", str(TASKS), "--output_path", str(out),
               "--log_samples", "--batch_size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    samples = {}
    for task in ("hub_local_ll", "hub_local_gen"):
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return samples


def test_lm_eval_through_the_server_equals_the_in_process_numbers(tiny_base, trained_run, tmp_path):
    publish(trained_run, tmp_path / "store", "e2e")
    server = start_server(tmp_path, tmp_path / "store", tiny_base)
    try:
        samples = lm_eval(server.url, tiny_base, tmp_path / "out")
    finally:
        server.stop()
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task)
    engine.manager.add_adapter(AdapterStore(tmp_path / "store").load("e2e"))
    tokenizer = engine.backbone.tokenizer
    for sample in samples["hub_local_ll"]:
        context, continuation = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
        whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
        seq = engine.new_sequence("e2e", TokenPrompt(tuple(whole)), sampling_params(max_new_tokens=0,
                                                                                     prompt_logprobs=1))
        decode_to_completion(engine, [seq])
        scored = seq.prompt_logprobs[len(head):]
        expected = sum(e.logprob for e in scored)
        greedy = all(e.logprob >= max(v for _, v in e.top) - 1e-6 for e in scored)
        served, served_greedy = sample["resps"][0][0]
        assert float(served) == pytest.approx(expected, abs=1e-4)
        assert (served_greedy in (True, "True")) == greedy
    for sample in samples["hub_local_gen"]:
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        seq = engine.new_sequence("e2e", TokenPrompt(tuple(tokenizer.encode(context))),
                                  sampling_params(max_new_tokens=8, stop=["\n", "."]))
        decode_to_completion(engine, [seq])
        assert sample["resps"][0][0] == seq.text
