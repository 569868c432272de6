"""Shared fixtures: a tiny random GPT-2 saved like a real one, small task data, a trained and published adapter."""

from __future__ import annotations

import csv
import os
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STANDIN = SHARED / "models" / "gpt2-standin"
E2E_DATA = SHARED / "data" / "e2e" / "original"

E2E_ROWS = [
    ("name[The Eagle], eatType[coffee shop], food[French]", "The Eagle is a coffee shop serving French food."),
    ("name[Alimentum], area[city centre], familyFriendly[no]", "Alimentum is in the city centre and is not family-friendly."),
    ("name[Blue Spice], priceRange[cheap], near[Rainbow Vegetarian Café]", "Blue Spice is cheap and near Rainbow Vegetarian Café."),
    ("name[The Mill], customer rating[5 out of 5], area[riverside]", "The Mill by the riverside is rated 5 out of 5."),
]


def make_tiny_gpt2(path: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 32) -> Path:
    """A random GPT-2 with the stand-in's real BPE tokenizer (8,192 tokens), saved with `save_pretrained`."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=8192, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(STANDIN).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """Same shape, other weights: adapters trained on `tiny_base` must be refused here."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-other"), seed=1)


def write_e2e_csv(path: Path, repeat: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        for _ in range(repeat):
            writer.writerows(E2E_ROWS)
    return path


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    """An E2E-format folder: devset.csv (trained on, with a held-out part) and testset_w_refs.csv."""
    folder = tmp_path_factory.mktemp("e2e")
    write_e2e_csv(folder / "devset.csv")
    write_e2e_csv(folder / "testset_w_refs.csv", repeat=1)
    return folder


@pytest.fixture(scope="session")
def jsonl_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("t2t") / "my.jsonl"
    rows = [{"question": f"what is {i} plus {i}?", "answer": f"{2 * i}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def trained_run(tiny_base, e2e_dir, tmp_path_factory) -> Path:
    """A short e2e training run on the tiny backbone, through the CLI."""
    from typer.testing import CliRunner

    from cli.main import app

    run_dir = tmp_path_factory.mktemp("runs") / "e2e"
    result = CliRunner().invoke(app, ["train", "e2e", "--base", str(tiny_base), "--data", str(e2e_dir),
                                      "--max-steps", "6", "--eval-every", "3", "--batch-size", "4",
                                      "--grad-accum", "1", "--device", "cpu", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


# The process-level fault suite (tests/faults/) runs in `make test` at a fast setting (fewer kills and fuzz examples,
# under 3 minutes); `make faults` (HUB_FAULTS=1) runs it in full and writes docs/RELIABILITY.md.
FULL_FAULTS = bool(os.environ.get("HUB_FAULTS"))
