"""Data-parallel training: 2 CPU processes (gloo) follow 1 process's loss curve at the same global batch, only
rank 0 writes the run folder, and the exported adapter publishes and serves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GPT2LMHeadModel

from hub.serving.batch import decode_to_completion
from hub.model.backbone import load_backbone
from hub.serving.engine import Engine, SamplingParams
from hub.store.local import AdapterStore
from hub.training.distributed import relaunch_command, shard, single_process_accelerate_note
from tasks import make_task

# Same data, same global batch (8), no dropout: the only difference is float summation order over 2 processes.
LOSS_TOLERANCE = 1e-4
STEPS = ["--max-steps", "4", "--eval-every", "2", "--grad-accum", "2", "--device", "cpu", "--seed", "3"]
MR = "name[The Eagle], eatType[coffee shop], food[French]"


@pytest.fixture(scope="module")
def base_without_dropout(tiny_base, tmp_path_factory) -> Path:
    """The tiny GPT-2 with dropout off, so that 1 and 2 processes compute the same function."""
    path = tmp_path_factory.mktemp("tiny-no-dropout")
    GPT2LMHeadModel.from_pretrained(tiny_base, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(launcher: list[str], base: Path, data: Path, out: Path, batch_size: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "e2e", "--base", str(base), "--data", str(data), "--batch-size", str(batch_size),
            "--out", str(out), *STEPS]
    result = subprocess.run([*launcher, "-m", "hub", *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def runs(base_without_dropout, e2e_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    single = train([sys.executable], base_without_dropout, e2e_dir, root / "one", batch_size=8)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port())]
    double = train(accelerate, base_without_dropout, e2e_dir, root / "two", batch_size=4)
    return root, single, double


def curves(run_dir: Path) -> tuple[list[float], list[float]]:
    log = json.loads((run_dir / "train_log.json").read_text())
    return [s["loss"] for s in log["steps"]], [e["eval_loss"] for e in log["evals"]]


def test_two_processes_follow_one_process_loss_curve(runs):
    root, _, _ = runs
    train_one, eval_one = curves(root / "one")
    train_two, eval_two = curves(root / "two")
    assert len(train_one) == len(train_two) == 4 and len(eval_one) == len(eval_two) == 2
    assert max(abs(a - b) for a, b in zip(train_one, train_two)) <= LOSS_TOLERANCE, (train_one, train_two)
    assert max(abs(a - b) for a, b in zip(eval_one, eval_two)) <= LOSS_TOLERANCE, (eval_one, eval_two)
    assert train_one[0] != train_one[-1], "the curve moves: the comparison is not of two untrained models"


def test_only_rank_zero_writes_and_prints(runs):
    root, _, double = runs
    assert sorted(p.name for p in (root / "two").iterdir()) == sorted(p.name for p in (root / "one").iterdir())
    assert double.stdout.count("publish it with: hub publish") == 1
    assert "2 process(es)" in double.stdout
    assert double.stdout.count("trained 4 steps") == 1


def test_the_data_parallel_adapter_publishes_and_serves_like_the_single_process_one(runs, base_without_dropout,
                                                                                   tmp_path):
    root, _, _ = runs
    store = AdapterStore(tmp_path / "store")
    backbone = load_backbone(str(base_without_dropout), "cpu")
    engine = Engine(backbone, make_task)
    texts = []
    for run in ("one", "two"):
        stored = store.publish(root / run / "best", name=f"e2e-{run}")
        resident = engine.manager.add_adapter(store.load(stored.ref, backbone.fingerprint))
        sequence = decode_to_completion(engine, [engine.new_sequence(resident.name, MR, SamplingParams(max_new_tokens=8))])[0]
        assert sequence.finish_reason in ("stop", "length") and sequence.output_ids
        texts.append(sequence.output_ids)
    assert texts[0] == texts[1], "greedy decoding with the two adapters agrees"


def test_shards_cover_a_global_batch_once():
    items = list(range(7))
    shards = [shard(items, rank, 3) for rank in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]


def test_nproc_relaunches_under_torchrun_without_itself():
    command = relaunch_command(2, ["train", "e2e", "--nproc", "2", "--data", "d", "--nproc=2"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[5:] == ["-m", "hub", "train", "e2e", "--data", "d"]


def test_a_single_process_from_accelerate_launch_on_cpu_is_said(monkeypatch):
    """`accelerate launch --num_processes 2` without GPUs runs its simple launcher: MASTER_ADDR, no WORLD_SIZE."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert "--multi_gpu" in single_process_accelerate_note()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert single_process_accelerate_note() is None
