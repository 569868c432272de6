"""`hub train --method full|lora`: the baselines train with the adapter's Trainer, save apart and evaluate alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2LMHeadModel
from typer.testing import CliRunner

from hub.adapters.vlm import adapter_parameter_count
from hub.model.backbone import load_backbone
from hub.training.baselines import lora_rank, make_trainer
from cli.main import app
from hub.errors import HubError
from hub.training.run_dir import RunDir
from hub.training.trainer import TrainConfig
from tasks import make_task

C_ATTN = "transformer.h.0.attn.c_attn.weight"


def invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def train(method: str, base: Path, data: Path, out: Path, steps: int = 4) -> str:
    return invoke("train", "e2e", "--method", method, "--base", base, "--data", data, "--max-steps", steps,
                  "--eval-every", 2, "--batch-size", 4, "--grad-accum", 1, "--device", "cpu", "--out", out)


@pytest.fixture(autouse=True)
def no_java(monkeypatch):
    """Scores without METEOR's 8 s start-up (BLEU and NIST only); test_evaluation covers the Java path."""
    monkeypatch.setattr("hub.evaluation.decode.shutil.which", lambda name: None)


@pytest.fixture(scope="module")
def full_run(tiny_base, e2e_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    train("full", tiny_base, e2e_dir, run)
    return run


@pytest.fixture(scope="module")
def lora_run(tiny_base, e2e_dir, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("lora") / "run"
    return run, train("lora", tiny_base, e2e_dir, run)


def eval_metrics(run: Path, data: Path, out: Path) -> dict:
    invoke("eval", "--model", run, "--data", data, "--device", "cpu", "--limit", 2, "--max-new-tokens", 4,
           "--out", out)
    return json.loads((out / "metrics.json").read_text())


def test_full_finetuning_saves_its_own_changed_model(full_run, tiny_base):
    assert {"train_log.json", "loss_curve.png", "checkpoint.pt", "best"} <= {p.name for p in full_run.iterdir()}
    base = GPT2LMHeadModel.from_pretrained(tiny_base).state_dict()
    trained = GPT2LMHeadModel.from_pretrained(full_run / "best")
    meta = json.loads((full_run / "best" / "task_meta.json").read_text())
    k, vocab = len(meta["special_tokens"]), base["transformer.wte.weight"].shape[0]
    assert meta["method"] == "full" and meta["first_token_id"] == vocab
    assert trained.config.vocab_size == vocab + k
    assert not trained.state_dict()[C_ATTN].equal(base[C_ATTN])
    assert not trained.transformer.wte.weight[:vocab].equal(base["transformer.wte.weight"])
    assert load_backbone(tiny_base, "cpu").model.state_dict()[C_ATTN].equal(base[C_ATTN]), "the base is untouched"
    tokenizer = AutoTokenizer.from_pretrained(full_run / "best")
    assert tokenizer.convert_tokens_to_ids(meta["eos_token"]) == vocab + 1


def test_full_finetuning_is_not_publishable_but_evaluates(full_run, e2e_dir, tmp_path):
    result = CliRunner().invoke(app, ["publish", str(full_run), "--store", str(tmp_path / "store")])
    assert isinstance(result.exception, HubError) and "not an adapter" in str(result.exception)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    metrics = eval_metrics(full_run, e2e_dir, tmp_path / "ev")
    assert metrics["num_sources"] == 2 and "bleu" in metrics["scores"]


def test_lora_matches_the_adapter_size_trains_and_evaluates(lora_run, tiny_base, e2e_dir, tmp_path):
    run, output = lora_run
    meta = json.loads((run / "best" / "task_meta.json").read_text())
    adapter = adapter_parameter_count(2, 32, 10) + len(meta["special_tokens"]) * 32
    assert abs(meta["trainable_params"] - adapter) / adapter < 0.05
    assert f"{meta['trainable_params']:,}" in output and f"{adapter:,}" in output
    weights = load_file(run / "best" / "adapter_model.safetensors")
    assert weights and all("c_attn.lora_" in key for key in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), "B starts at zero: it trained"
    metrics = eval_metrics(run, e2e_dir, tmp_path / "ev")
    assert metrics["num_sources"] == 2


def test_lora_rank_is_the_nearest_match():
    for d, layers, b in [(768, 12, 10), (768, 12, 300), (256, 6, 100), (32, 2, 10)]:
        target = adapter_parameter_count(layers, d, b)
        best = min(range(1, 200), key=lambda r: abs(layers * 4 * d * r - target))
        assert lora_rank(layers, d, b) == best


def test_lora_run_resumes(lora_run, tiny_base, e2e_dir, tmp_path):
    run, _ = lora_run
    resumed = tmp_path / "run"
    resumed.mkdir()
    for path in run.iterdir():  # a copy without best/ (its LoRA weights are re-exported on resume)
        if path.is_file():
            (resumed / path.name).write_bytes(path.read_bytes())
    output = train("lora", tiny_base, e2e_dir, resumed, steps=6)
    assert "resuming" in output
    assert [s["step"] for s in json.loads((resumed / "train_log.json").read_text())["steps"]] == list(range(1, 7))


def test_patience_stops_training_without_improvement(tiny_base, e2e_dir, tmp_path):
    """With lr 0 the held-out loss never improves after the first evaluation: patience 1 stops at the second."""
    task = make_task("e2e")
    config = TrainConfig(name="e2e", task_type="e2e", task_config={}, data=str(e2e_dir), bottleneck=10, lr=0.0,
                         batch_size=4, grad_accum=1, max_length=64, epochs=1, max_steps=10, eval_every=2,
                         base=str(tiny_base), method="full", patience=1)
    RunDir(tmp_path).prepare(config)
    trainer = make_trainer(load_backbone(tiny_base, "cpu"), task, config, tmp_path)
    log = trainer.train(task.load_examples(str(e2e_dir), "train"), task.load_examples(str(e2e_dir), "validation"))
    assert [e["step"] for e in log.evals] == [2, 4] and log.best_step == 2
