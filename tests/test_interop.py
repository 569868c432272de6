"""AdapterHub interop: a stored version in a plain transformers GPT-2 with `adapters`, in one call, decodes the
same greedy tokens as the hub; `hub export --format adapterhub` writes a folder that loads the same way."""

from __future__ import annotations

import json

import pytest
from transformers import GPT2LMHeadModel
from typer.testing import CliRunner

from cli.main import app
from hub.errors import BackboneMismatchError, IntegrityError
from hub.interop import load_into_adapters
from hub.store.format import AdapterMeta
from tests.test_evaluation import engine_greedy, store, test_mrs  # noqa: F401 (fixtures)

MAX_NEW = 12


@pytest.fixture(scope="module")
def hub_tokens(store, tiny_base, test_mrs) -> list[list[int]]:  # noqa: F811
    return [s.output_ids for s in engine_greedy(tiny_base, store.load("e2e"), test_mrs, MAX_NEW)]


def test_the_version_metadata_holds_the_prompt_layout_and_token_types(store):
    layout = store.show("e2e").meta.layout
    assert layout["prompt"][0] == "<bos_nlg>" and layout["target_marker"] == "<response>"
    assert "typed by the special token that opens its segment" in layout["token_types"]
    assert layout["example"]["segments"][0][0] == "<name>"


def test_layout_is_optional_metadata_old_versions_still_read(store):
    data = store.show("e2e").meta.to_dict()
    old = {k: v for k, v in data.items() if k != "layout"}
    assert AdapterMeta.from_dict(old, "hub.json", stored=True).layout is None
    assert "layout" not in AdapterMeta.from_dict(old, "hub.json", stored=True).to_dict()
    assert AdapterMeta.from_dict(data, "hub.json", stored=True).to_dict() == data
    with pytest.raises(IntegrityError, match="layout must be an object"):
        AdapterMeta.from_dict({**old, "layout": "segments"}, "hub.json", stored=True)


def test_a_plain_adapters_model_gives_the_hubs_greedy_tokens(store, tiny_base, test_mrs, hub_tokens):
    model = GPT2LMHeadModel.from_pretrained(tiny_base)
    task = load_into_adapters(model, store.show("e2e").path)
    assert task.adapter_name == "e2e" and model.active_adapters is not None
    assert [task.generate_ids(mr, MAX_NEW) for mr in test_mrs] == hub_tokens
    assert all(len(ids) == MAX_NEW for ids in hub_tokens)  # compared over the whole length


def test_token_types_matter(store, tiny_base, test_mrs):
    """What the one call spares a user: without the token types the logits differ."""
    model = GPT2LMHeadModel.from_pretrained(tiny_base)
    task = load_into_adapters(model, store.show("e2e").path)
    inputs = task.encode(test_mrs[0])
    with_types = model(**inputs).logits
    without = model(input_ids=inputs["input_ids"]).logits
    assert (with_types - without).abs().max() > 1e-3


def test_hub_export_adapterhub_folder_loads_the_same(store, tiny_base, test_mrs, hub_tokens, tmp_path):
    out = tmp_path / "exported"
    result = CliRunner().invoke(app, ["export", "e2e", "--format", "adapterhub", "--out", str(out),
                                      "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    assert {"adapter_config.json", "adapter.safetensors", "task_tokens.safetensors", "hub.json", "README.md"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["name"] == "e2e"
    task = load_into_adapters(GPT2LMHeadModel.from_pretrained(tiny_base), out)
    assert task.generate_ids(test_mrs[0], MAX_NEW) == hub_tokens[0]


def test_another_backbone_is_refused(store, other_base):
    with pytest.raises(BackboneMismatchError, match="other GPT-2 weights"):
        load_into_adapters(GPT2LMHeadModel.from_pretrained(other_base), store.show("e2e").path)
