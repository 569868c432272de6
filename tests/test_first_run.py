"""What a first run from the README stumbled on, each checked: a single test file for `hub eval` (and several
references per input), pictures from `hub show --plot` and `hub eval`, a text2text generation length from the
training targets, a fast offline failure and a visible default for `--base`, and no spurious adapters warning."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from cli.main import app
from hub.errors import HubError
from hub.evaluation.decode import unique_sources
from hub.model.backbone import load_backbone
from hub.training.trainer import attach_trainable_adapter
from tasks import make_task
from tests.conftest import E2E_ROWS, write_e2e_csv

PNG = b"\x89PNG\r\n\x1a\n"


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def store(trained_run, tmp_path_factory):
    store = tmp_path_factory.mktemp("first-run") / "store"
    invoke("publish", trained_run, "--store", store)
    return store


def test_hub_eval_takes_a_single_test_file_and_draws_the_metrics(store, tiny_base, tmp_path):
    test_file = write_e2e_csv(tmp_path / "my-test.csv", repeat=1)
    out = tmp_path / "eval"
    invoke("eval", "e2e", "--data", test_file, "--store", store, "--base", tiny_base, "--device", "cpu",
           "--max-new-tokens", "4", "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_sources"] == len(E2E_ROWS)
    assert (out / "metrics.png").read_bytes()[:8] == PNG


def test_text2text_takes_several_references_per_input(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"input": "2+2", "target": ["4", "four"]}) + "\n"
                    + json.dumps({"input": "3+3", "target": "6"}) + "\n")
    sources, references = unique_sources(make_task("text2text").load_examples(str(path), "test"))
    assert sources == ["2+2", "3+3"] and references == [["4", "four"], ["6"]]


def test_hub_show_plot_writes_the_training_curve(store, tmp_path):
    result = invoke("show", "e2e", "--store", store, "--plot", "--plot-out", tmp_path / "curve.png")
    assert "training curve written to" in result.output
    assert (tmp_path / "curve.png").read_bytes()[:8] == PNG


def test_text2text_generation_length_comes_from_the_training_targets():
    task = make_task("text2text")
    assert task.defaults.max_new_tokens == 64 and "max_new_tokens" not in task.config()
    task.fit_to_targets([12, 80, 40])
    assert task.defaults.max_new_tokens == 100  # the longest target, 80, plus a quarter
    served = make_task("text2text", task.config())  # as the engine rebuilds it from the stored metadata
    assert served.defaults.max_new_tokens == 100 and make_task("text2text").defaults.max_new_tokens == 64


def test_offline_without_a_local_base_fails_fast_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(HubError, match="unreachable.*--base"):
        load_backbone("nobody/no-such-gpt2", "cpu")


def test_train_help_shows_the_default_base():
    assert "[default: gpt2]" in invoke("train", "--help").output


def test_attaching_an_adapter_logs_no_spurious_warning(tiny_base, caplog):
    with caplog.at_level(logging.WARNING):
        attach_trainable_adapter(load_backbone(str(tiny_base), "cpu"), make_task("e2e"), "e2e", 4, seed=0)
    assert "none are activated" not in caplog.text
