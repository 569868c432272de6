"""`hub eval`: greedy decoding equals the engine's, beam search, E2E grouping, reports and store metadata."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from hub.serving.batch import decode_to_completion
from hub.model.backbone import load_backbone
from cli.main import app
from hub.serving.engine import Engine, SamplingParams
from hub.evaluation.decode import Decoding, TaskTokenMask, engine_task_model, generate_ids, unique_sources
from hub.store.local import AdapterStore
from hub.store.versions import LoadedAdapter
from hub.task import Example
from tasks import make_task


@pytest.fixture(scope="module")
def store(trained_run, tmp_path_factory) -> AdapterStore:
    store = AdapterStore(tmp_path_factory.mktemp("eval") / "store")
    store.publish(trained_run / "best")
    return store


@pytest.fixture(scope="module")
def test_mrs(e2e_dir) -> list[str]:
    return unique_sources(make_task("e2e").load_examples(str(e2e_dir), "test"))[0]


def engine_greedy(base, adapter: LoadedAdapter, mrs: list[str], max_new_tokens: int) -> list:
    engine = Engine(load_backbone(base, "cpu"), make_task)
    engine.manager.add_adapter(adapter)
    return decode_to_completion(engine, [engine.new_sequence(adapter.name, mr, SamplingParams(max_new_tokens=max_new_tokens))
                       for mr in mrs])


def adapter_stopping_some_rows_early(base, adapter: LoadedAdapter, mrs: list[str]) -> LoadedAdapter:
    """The 6-step adapter never emits its EOS; give the EOS row a random direction under which the engine stops
    some sequences early and runs others to the length limit (the case where batched decoders can differ)."""
    for seed in range(50):
        rows = adapter.token_rows.clone()
        rows[1] = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(seed)) * 3
        candidate = dataclasses.replace(adapter, token_rows=rows)
        if len({s.finish_reason for s in engine_greedy(base, candidate, mrs, 12)}) == 2:
            return candidate
    pytest.fail("no EOS row found that stops only some sequences")


def test_greedy_eval_equals_the_engines_greedy_decode(store, tiny_base, test_mrs):
    adapter = adapter_stopping_some_rows_early(tiny_base, store.load("e2e"), test_mrs)
    expected = engine_greedy(tiny_base, adapter, test_mrs, 12)
    task_model = engine_task_model(load_backbone(tiny_base, "cpu"), adapter, "e2e", store_ref=None,
                                   make_task=make_task)
    got = generate_ids(task_model, test_mrs, Decoding(max_new_tokens=12, batch_size=3), progress=False)
    assert got == [s.output_ids for s in expected]
    assert sorted(len(ids) for ids in got)[0] < 12 == sorted(len(ids) for ids in got)[-1]


def test_beam_search_gives_one_output_per_unique_source(store, tiny_base, test_mrs):
    task_model = engine_task_model(load_backbone(tiny_base, "cpu"), store.load("e2e"), "e2e", store_ref=None,
                                   make_task=make_task)
    decoding = Decoding(max_new_tokens=8, num_beams=3, length_penalty=0.9, no_repeat_ngram_size=2, batch_size=3)
    outputs = generate_ids(task_model, test_mrs, decoding, progress=False)
    assert len(outputs) == len(test_mrs) == 4 and all(0 < len(ids) <= 8 for ids in outputs)
    assert decoding.describe() == "beam 3, length penalty 0.9, no-repeat-ngram 2, at most 8 new tokens"
    assert outputs != generate_ids(task_model, test_mrs, Decoding(max_new_tokens=8, batch_size=3), progress=False)


def test_sources_keep_first_occurrence_order_with_their_references():
    examples = [Example("name[B]", "b1"), Example("name[A]", "a1"), Example("name[B]", "b2"),
                Example({"x": 1}, "x1"), Example({"x": 1}, "x2")]
    assert unique_sources(examples) == (["name[B]", "name[A]", {"x": 1}], [["b1", "b2"], ["a1"], ["x1", "x2"]])


def test_task_tokens_are_masked_but_the_eos_after_the_first_token():
    mask = TaskTokenMask(base_vocab=10, eos_id=11, prompt_width=4)
    scores = torch.zeros(2, 14)
    first, later = mask(torch.zeros(2, 4, dtype=torch.long), scores), mask(torch.zeros(2, 5, dtype=torch.long), scores)
    assert torch.isinf(first[:, 10:]).all() and not torch.isinf(first[:, :10]).any()
    assert later[:, 11].eq(0).all() and torch.isinf(later[:, [10, 12, 13]]).all()


def test_eval_cli_writes_reports_and_records_metrics(store, e2e_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("hub.evaluation.decode.shutil.which", lambda name: None)  # as on a machine without Java
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["eval", "e2e", "--store", str(store.root), "--data", str(e2e_dir),
                                      "--device", "cpu", "--limit", "3", "--max-new-tokens", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len((out / "outputs.txt").read_text().splitlines()) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_sources"] == 3 and set(metrics["scores"]) == {"bleu", "nist"}
    assert "java" in metrics["notes"][0] and "| bleu |" in (out / "metrics.md").read_text()
    recorded = store.show("e2e").meta.metrics["test"]
    assert recorded["bleu"] == metrics["scores"]["bleu"] and recorded["num_sources"] == 3
    assert "eval_loss" in store.show("e2e").meta.metrics, "training metrics are kept"


def test_eval_of_a_run_export_before_publishing(trained_run, e2e_dir, tmp_path):
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["eval", "--run", str(trained_run), "--data", str(e2e_dir), "--device", "cpu",
                                      "--limit", "2", "--max-new-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["label"] == str(trained_run)
