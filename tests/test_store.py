"""Adapter store: publish/list/show/remove, versions, renames, atomicity, integrity, backbone checks."""

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub.errors import BackboneMismatchError, HubError, IntegrityError, NotFoundError
from hub.adapters.vlm_format import adapter_layers
from hub.store.fingerprint import fingerprint_mismatch
from hub.store.local import AdapterStore
from hub.store.refs import parse_ref

D, LAYERS, BOTTLENECK, K = 16, 2, 4, 3
BACKBONE = {
    "model_type": "gpt2", "n_layer": LAYERS, "n_embd": D, "n_head": 2, "vocab_size": 50,
    "weights_sha256": "1a2b3c4d" + "0" * 56, "source": "tiny-gpt2",
}


def tiny_model():
    import adapters
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=D, n_head=2, vocab_size=50, n_positions=32))
    adapters.init(model)
    return model


@pytest.fixture(scope="session")
def config_template(tmp_path_factory) -> dict:
    """A real adapter_config.json as written by `adapters` for a VLM-shaped SeqBn adapter named 't'."""
    import adapters

    model = tiny_model()
    config = adapters.SeqBnConfig(
        reduction_factor=math.nextafter(D / BOTTLENECK, 0.0), non_linearity="relu", ln_before=True
    )
    model.add_adapter("t", config=config)
    out = tmp_path_factory.mktemp("adapter_config")
    model.save_adapter(str(out), "t", with_head=False)
    return json.loads((out / "adapter_config.json").read_text())


def adapter_tensors(name: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "adapter_down.0.weight": (D,), "adapter_down.0.bias": (D,),
        "adapter_down.1.weight": (BOTTLENECK, D), "adapter_down.1.bias": (BOTTLENECK,),
        "adapter_up.weight": (D, BOTTLENECK), "adapter_up.bias": (D,),
    }
    return {
        f"transformer.h.{i}.output_adapters.adapters.{name}.{part}": torch.randn(shape, generator=g)
        for i in range(LAYERS)
        for part, shape in shapes.items()
    }


def make_export(directory: Path, config_template: dict, name: str = "t", seed: int = 0) -> Path:
    """Write a run export like the trainer's: adapter files, token rows and adapter_meta.json."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({**config_template, "name": name}))
    save_file(adapter_tensors(name, seed), directory / "adapter.safetensors", metadata={"format": "pt"})
    rows = torch.randn(K, D, generator=torch.Generator().manual_seed(seed + 1000))
    save_file({"rows": rows}, directory / "task_tokens.safetensors")
    meta = {
        "name": name, "task_type": "classification", "task_config": {"labels": ["a", "b"]},
        "special_tokens": ["<t:q>", "<t:a>", "<t:eos>"], "eos_token": "<t:eos>",
        "bottleneck": BOTTLENECK, "trainable_params": 1234, "trainable_pct": 0.5,
        "metrics": {"accuracy": 0.9}, "backbone": BACKBONE,
    }
    (directory / "adapter_meta.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture
def export(tmp_path, config_template) -> Path:
    return make_export(tmp_path / "run", config_template)


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def hidden_entries(store: AdapterStore) -> list[str]:
    return [p.name for p in store.root.iterdir() if p.name.startswith(".")]


def test_publish_list_show_remove(store, export):
    stored = store.publish(export)
    assert (stored.name, stored.version, stored.ref) == ("t", "1", "t@1")
    assert sorted(p.name for p in stored.path.iterdir()) == [
        "adapter.safetensors", "adapter_config.json", "hub.json", "task_tokens.safetensors",
    ]
    hub = json.loads((stored.path / "hub.json").read_text())
    assert hub["task_type"] == "classification" and hub["version"] == "1"
    assert hub["created_at"].endswith("+00:00") and "." in hub["created_at"]
    assert set(hub["files"]) == {"adapter_config.json", "adapter.safetensors", "task_tokens.safetensors"}

    [summary] = store.list()
    assert summary.name == "t" and [v.version for v in summary.versions] == ["1"]
    assert store.show("t@1").meta.to_dict() == hub

    assert store.remove("t") == ["t@1"]
    assert store.list() == [] and not (store.root / "t").exists() and hidden_entries(store) == []
    with pytest.raises(NotFoundError):
        store.show("t")


def test_auto_and_explicit_versions_and_newest(store, export):
    assert [store.publish(export).version for _ in range(2)] == ["1", "2"]
    assert store.show("t").version == "2"
    assert store.publish(export, version="0.9-rc").version == "0.9-rc"
    assert store.show("t").version == "0.9-rc"  # newest means latest created_at
    assert store.publish(export).version == "3"
    assert [v.version for v in store.list()[0].versions] == ["1", "2", "0.9-rc", "3"]
    assert store.show("t@2").version == "2"


def test_duplicate_version_refused(store, export):
    store.publish(export, version="1")
    with pytest.raises(HubError, match="already exists; choose another --version"):
        store.publish(export, version="1")
    assert hidden_entries(store) == []
    assert [v.version for v in store.list()[0].versions] == ["1"]


def test_unknown_refs_list_what_exists(store, export):
    store.publish(export)
    with pytest.raises(NotFoundError, match=r"available: t"):
        store.show("nope")
    with pytest.raises(NotFoundError, match=r"versions: 1"):
        store.show("t@7")
    with pytest.raises(NotFoundError):
        store.remove("t@7")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".", "..", "-x", ".hidden", "x" * 65, "a b"])
def test_invalid_names_and_versions_refused(store, export, bad):
    with pytest.raises(HubError, match="adapter name"):
        store.publish(export, name=bad)
    with pytest.raises(HubError, match="adapter version"):
        store.publish(export, version=bad)
    assert store.list() == [] and hidden_entries(store) == []


def test_parse_ref():
    assert parse_ref("sst2") == ("sst2", None)
    assert parse_ref("sst2@3") == ("sst2", "3")
    for bad in ["sst2@", "@3", "a@b@c", "a@../b"]:
        with pytest.raises(HubError):
            parse_ref(bad)


def test_publish_under_other_name_is_loadable_by_adapters(store, export):
    stored = store.publish(export, name="other")
    tensors = load_file(stored.path / "adapter.safetensors")
    assert all(".adapters.other." in key for key in tensors)
    assert json.loads((stored.path / "adapter_config.json").read_text())["name"] == "other"
    assert stored.meta.name == "other"

    model = tiny_model()
    model.load_adapter(str(stored.path), load_as="other", with_head=False, use_safetensors=True)
    state = model.state_dict()
    original = load_file(export / "adapter.safetensors")
    for key, value in original.items():
        assert torch.equal(state[key.replace(".adapters.t.", ".adapters.other.")], value)

    layers = adapter_layers(store.load("other").adapter_tensors, "other")
    assert len(layers) == LAYERS and layers[0]["down_weight"].shape == (BOTTLENECK, D)


@pytest.mark.parametrize("crash_point", ["copy", "rename"])
def test_publish_is_atomic(store, export, monkeypatch, crash_point):
    store.publish(export)
    before_list, before_snapshot = store.list(), store.snapshot()

    def partial_copy(src, dst, *args, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:10])
        raise OSError("disk full")

    def failing_rename(src, dst):
        raise OSError("I/O error")

    if crash_point == "copy":
        monkeypatch.setattr(shutil, "copyfile", partial_copy)
    else:
        monkeypatch.setattr("hub.store.local.os.rename", failing_rename)
    with pytest.raises(OSError):
        store.publish(export)
    monkeypatch.undo()

    assert not (store.root / "t" / "2").exists()
    assert hidden_entries(store) == []
    assert store.list() == before_list and store.snapshot() == before_snapshot
    assert store.publish(export).version == "2"


def test_concurrent_auto_versions_are_distinct(store, export):
    barrier, results, errors = threading.Barrier(6), [], []

    def publish():
        barrier.wait()
        try:
            results.append(store.publish(export).version)
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results, key=int) == ["1", "2", "3", "4", "5", "6"]
    assert hidden_entries(store) == []


@pytest.mark.parametrize(
    "filename", ["adapter.safetensors", "task_tokens.safetensors", "adapter_config.json"]
)
def test_corrupted_file_refused_on_load(store, export, filename):
    stored = store.publish(export)
    path = stored.path / filename
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{filename} of 't@1' is corrupted or modified"):
        store.load("t")


def test_pickle_file_refused_on_load(store, export):
    stored = store.publish(export)
    (stored.path / "pytorch_adapter.bin").write_bytes(b"not really a pickle")
    with pytest.raises(IntegrityError, match="pytorch_adapter.bin"):
        store.load("t@1")


def test_load_returns_verified_tensors(store, export):
    store.publish(export)
    loaded = store.load("t", backbone=dict(BACKBONE, source="/elsewhere/tiny"))
    assert (loaded.name, loaded.version, loaded.ref) == ("t", "1", "t@1")
    assert torch.equal(loaded.token_rows, load_file(export / "task_tokens.safetensors")["rows"])
    assert loaded.adapter_tensors.keys() == load_file(export / "adapter.safetensors").keys()
    assert loaded.meta.special_tokens == ("<t:q>", "<t:a>", "<t:eos>")


@pytest.mark.parametrize(
    "filename", ["adapter_config.json", "adapter.safetensors", "task_tokens.safetensors", "adapter_meta.json"]
)
def test_missing_export_file_named(store, export, filename):
    (export / filename).unlink()
    with pytest.raises(HubError, match=f"missing {filename}"):
        store.publish(export)
    assert store.list() == [] and hidden_entries(store) == []


@pytest.mark.parametrize("filename", ["adapter_config.json", "adapter.safetensors", "adapter_meta.json"])
def test_broken_export_file_named(store, export, filename):
    (export / filename).write_bytes(b"\x00garbage")
    with pytest.raises(HubError, match=filename):
        store.publish(export)


def test_export_validation_of_meta_and_rows(store, export):
    meta = json.loads((export / "adapter_meta.json").read_text())
    (export / "adapter_meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "eos_token"}))
    with pytest.raises(HubError, match="adapter_meta.json.*lacks eos_token"):
        store.publish(export)
    (export / "adapter_meta.json").write_text(json.dumps(meta))
    save_file({"rows": torch.zeros(K + 1, D)}, export / "task_tokens.safetensors")
    with pytest.raises(HubError, match=r"task_tokens.safetensors.*rows has shape \(4, 16\)"):
        store.publish(export)


def test_backbone_mismatch_names_needed_backbone(store, export):
    store.publish(export)
    loaded = dict(BACKBONE, n_layer=12, weights_sha256="f" * 64, source="gpt2")
    with pytest.raises(BackboneMismatchError) as info:
        store.load("t", backbone=loaded)
    message = str(info.value)
    assert message.startswith(
        "adapter 't@1' needs backbone 'tiny-gpt2' (gpt2, 2 layers, d=16, 2 heads, vocab 50"
    )
    assert "weights 1a2b3c4d…" in message and "loaded backbone is 'gpt2'" in message
    assert "differs in n_layer, weights_sha256" in message


def test_fingerprint_mismatch_ignores_source():
    assert fingerprint_mismatch(BACKBONE, dict(BACKBONE, source="other/path")) is None
    assert "n_embd" in fingerprint_mismatch(BACKBONE, dict(BACKBONE, n_embd=32))


def test_adapter_layers_rejects_incomplete_adapters():
    tensors = adapter_tensors("t", seed=0)
    assert len(adapter_layers(tensors, "t")) == LAYERS
    with pytest.raises(IntegrityError, match="unexpected tensor"):
        adapter_layers(tensors, "other")
    del tensors["transformer.h.1.output_adapters.adapters.t.adapter_up.bias"]
    with pytest.raises(IntegrityError, match="layer 1: missing up_bias"):
        adapter_layers(tensors, "t")
    only_layer_1 = {k: v for k, v in adapter_tensors("t", seed=0).items() if ".h.1." in k}
    with pytest.raises(IntegrityError, match="expected 0..n-1"):
        adapter_layers(only_layer_1, "t")


def test_update_metrics_merges_and_keeps_checksums(store, export):
    store.publish(export)
    updated = store.update_metrics("t@1", {"f1": 0.8, "accuracy": 0.95})
    assert updated.meta.metrics == {"accuracy": 0.95, "f1": 0.8}
    assert store.show("t@1").meta.metrics == {"accuracy": 0.95, "f1": 0.8}
    assert store.load("t").meta.metrics["f1"] == 0.8
    assert sorted(p.name for p in updated.path.iterdir() if p.name.startswith(".")) == []


def test_snapshot_changes_after_publish(store, export):
    assert store.snapshot() == {}
    first = store.publish(export)
    snap = store.snapshot()
    assert snap == {"t@1": first.meta.created_at}
    store.publish(export, name="u")
    assert set(store.snapshot()) == {"t@1", "u@1"}
    store.update_metrics("t@1", {"x": 1})
    assert store.snapshot()["t@1"] == snap["t@1"]


def test_list_ignores_internal_and_unreadable_dirs(store, export):
    store.publish(export)
    (store.root / ".tmp-123" / "x").mkdir(parents=True)
    (store.root / ".trash-9").mkdir()
    (store.root / "t" / "5").mkdir()  # no hub.json: skipped, with the reason
    (store.root / "empty").mkdir()
    assert [(s.name, [v.version for v in s.versions]) for s in store.list()] == [("t", ["1"])]
    assert [(k.ref, k.reason) for k in store.list()[0].skipped] == [("t@5", "hub.json of 't@5' is missing or not a regular file")]
    assert list(store.snapshot()) == ["t@1", "t@5"]


def test_remove_one_version_then_last_removes_name_dir(store, export):
    store.publish(export)
    store.publish(export)
    assert store.remove("t@1") == ["t@1"]
    assert [v.version for v in store.list()[0].versions] == ["2"]
    assert store.remove("t@2") == ["t@2"]
    assert not (store.root / "t").exists() and hidden_entries(store) == []
    with pytest.raises(NotFoundError):
        store.remove("t")
