"""The CLI as a user runs it: train -> publish -> list/show -> generate -> rm, and clear errors, no tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MR = "name[The Eagle], eatType[coffee shop], food[French]"


def hub(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "hub", *map(str, args)], capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def fails_clearly(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.startswith("error: ")
    for word in words:
        assert word in result.stderr, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def store(trained_run, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("cli") / "store"
    hub("publish", trained_run, "--store", store)
    return store


def test_train_writes_a_complete_run(trained_run):
    assert {"run_config.json", "checkpoint.pt", "train_log.json", "loss_curve.png", "best"} <= {
        p.name for p in trained_run.iterdir()}
    log = json.loads((trained_run / "train_log.json").read_text())
    assert len(log["steps"]) == 6 and [e["step"] for e in log["evals"]] == [3, 6]
    assert all(e["eval_ppl"] > 1 for e in log["evals"])


def test_publish_list_show_generate_rm(store, trained_run, tiny_base):
    listed = json.loads(hub("list", "--store", store, "--json").stdout)
    assert [row["name"] for row in listed] == ["e2e"] and listed[0]["versions"] == ["1"]
    hub("publish", trained_run, "--store", store)
    shown = json.loads(hub("show", "e2e", "--store", store, "--json").stdout)
    assert shown["version"] == "2" and shown["task_type"] == "e2e" and shown["bottleneck"] == 10
    assert shown["backbone"]["n_layer"] == 2  # the payload and the run's training log, each checksummed
    assert set(shown["files"]) == {"adapter_config.json", "adapter.safetensors", "task_tokens.safetensors",
                                   "train_log.json"}
    assert "<eos_nlg>" in shown["special_tokens"]
    from transformers import GPT2LMHeadModel

    gpt2_params = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(tiny_base).parameters())
    assert shown["backbone_params"] == gpt2_params, "the share is of GPT-2 alone, not GPT-2 + adapter"
    assert abs(shown["trainable_pct"] - 100 * shown["trainable_params"] / gpt2_params) < 1e-9

    answer = json.loads(hub("generate", "--store", store, "--task", "e2e", MR, "--json",
                            "--max-new-tokens", "12").stdout)
    assert answer["task"] == "e2e" and answer["version"] == "2"
    assert answer["finish_reason"] in ("stop", "length") and answer["usage"]["prompt_tokens"] > 5
    again = json.loads(hub("generate", "--store", store, "--task", "e2e@1", MR, "--json", "--max-new-tokens",
                           "12", "--base", tiny_base).stdout)
    assert again["text"] == answer["text"], "greedy decoding is deterministic"
    assert hub("rm", "e2e@2", "--store", store).stdout.strip() == "removed e2e@2"
    assert json.loads(hub("list", "--store", store, "--json").stdout)[0]["versions"] == ["1"]


def test_text2text_from_a_users_jsonl(jsonl_data, tiny_base, tmp_path):
    run = tmp_path / "run"
    hub("train", "text2text", "--name", "mytask", "--data", jsonl_data, "--input-field", "question",
        "--target-field", "answer", "--base", tiny_base, "--max-steps", "2", "--batch-size", "4", "--out", run)
    hub("publish", run, "--store", tmp_path / "s")
    meta = json.loads(hub("show", "mytask", "--store", tmp_path / "s", "--json").stdout)
    # max_new_tokens from the training targets: at most 2 digit tokens + EOS, plus a quarter
    assert meta["task_config"] == {"input_field": "question", "target_field": "answer", "max_new_tokens": 4}
    assert meta["bottleneck"] == 100
    out = hub("generate", "--store", tmp_path / "s", "--task", "mytask", "what is 3 plus 3?",
              "--max-new-tokens", "4")
    assert out.returncode == 0


def test_training_resumes_from_its_run_dir(trained_run, tiny_base, e2e_dir, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(trained_run, run)
    result = hub("train", "e2e", "--base", tiny_base, "--data", e2e_dir, "--max-steps", "8", "--eval-every", "3",
                 "--batch-size", "4", "--grad-accum", "1", "--out", run)
    assert "resuming" in result.stdout + result.stderr
    log = json.loads((run / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == list(range(1, 9))


def test_bad_input_gets_a_clear_error(store, tiny_base, other_base, e2e_dir, tmp_path):
    train = ("train", "e2e", "--base", tiny_base, "--max-steps", "1", "--out", tmp_path / "r")
    fails_clearly(hub(*train, "--data", tmp_path / "missing.csv", check=False), "not found")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("meaning,text\na,b\n")
    fails_clearly(hub(*train, "--data", bad_csv, check=False), "missing field", "mr")
    fails_clearly(hub("train", "nope", "--data", bad_csv, check=False), "unknown task type", "e2e")
    fails_clearly(hub("generate", "--store", store, "--task", "nope", MR, check=False), "nope", "e2e")
    fails_clearly(hub("generate", "--store", store, "--task", "e2e", "not an mr", check=False), "meaning representation")
    fails_clearly(hub("generate", "--store", store, "--task", "e2e", MR, "--base", other_base, check=False),
                  "needs backbone", str(tiny_base.name))
    fails_clearly(hub("publish", tmp_path, "--store", store, "--name", "../evil", check=False), "name")

    corrupt = tmp_path / "corrupt-store"
    shutil.copytree(store, corrupt)
    weights = next(corrupt.glob("e2e/*/adapter.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    fails_clearly(hub("generate", "--store", corrupt, "--task", "e2e", MR, check=False), "adapter.safetensors")


def test_train_sets_and_reports_its_torch_threads(tiny_base, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"question": "q{i}", "answer": "a{i}"}}\n' for i in range(40)))
    out = hub("train", "text2text", "--base", tiny_base, "--data", data, "--input-field", "question",
              "--target-field", "answer", "--max-steps", "1", "--batch-size", "2", "--threads", "1",
              "--device", "cpu", "--out", tmp_path / "run").stdout
    assert "1 torch threads (--threads) each" in out
