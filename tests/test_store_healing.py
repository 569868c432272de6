"""A store that heals: bad versions are skipped with a reason and the newest good one serves; leftovers of killed
publishes are collected; links and FIFOs are refused without blocking; hub.json has one typed schema."""

import json
import os
import time

import pytest
from typer.testing import CliRunner

from cli.main import app as cli_app
from hub.errors import HubError, IntegrityError
from hub.store.local import AdapterStore
from hub.store.format import AdapterMeta
from tests.test_store import config_template, make_export  # noqa: F401  (config_template is a fixture)


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


@pytest.fixture
def two_versions(store, tmp_path, config_template):  # noqa: F811
    export = make_export(tmp_path / "run", config_template)
    store.publish(export)
    store.publish(export)
    return store


def edit_hub_json(store: AdapterStore, ref: str, change) -> None:
    name, version = ref.split("@")
    path = store.root / name / version / "hub.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_hub_json_lacking_a_key_skips_that_version_and_the_previous_one_serves(two_versions):
    store = two_versions
    edit_hub_json(store, "t@2", lambda d: d.pop("backbone"))
    [summary] = store.list()
    assert [v.version for v in summary.versions] == ["1"]
    assert [(k.ref, k.reason) for k in summary.skipped] == [("t@2", "hub.json of 't@2' lacks backbone")]
    assert store.show("t").version == "1" and store.load("t").version == "1"
    with pytest.raises(IntegrityError, match="'t@2' is skipped: hub.json of 't@2' lacks backbone"):
        store.show("t@2")


def test_wrong_types_in_hub_json_are_named(two_versions):
    store = two_versions
    edit_hub_json(store, "t@2", lambda d: d.update(bottleneck="4", special_tokens=[]))
    [skipped] = store.list()[0].skipped
    assert "bottleneck must be a positive integer" in skipped.reason
    assert "special_tokens must be a list of at least two non-empty strings" in skipped.reason


def test_corrupt_newest_version_falls_back_to_the_newest_good_one(two_versions):
    store = two_versions
    path = store.root / "t" / "2" / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    assert store.show("t").version == "1"
    assert "corrupted or modified" in store.list()[0].skipped[0].reason
    assert store.snapshot()["t@2"].startswith("skipped: ")


def test_no_usable_version_is_an_integrity_error_with_every_reason(two_versions):
    store = two_versions
    for ref in ("t@1", "t@2"):
        edit_hub_json(store, ref, lambda d: d.pop("files"))
    with pytest.raises(IntegrityError, match="no usable version.*t@1: .*lacks files.*t@2: .*lacks files"):
        store.show("t")


def test_unknown_keys_are_kept_and_written_back(two_versions):
    store = two_versions
    edit_hub_json(store, "t@2", lambda d: d.update(provenance={"latent": 32}))
    assert store.show("t@2").meta.extra == {"provenance": {"latent": 32}}
    store.update_metrics("t@2", {"bleu": 1.0})
    data = json.loads((store.root / "t" / "2" / "hub.json").read_text())
    assert data["provenance"] == {"latent": 32} and data["metrics"]["bleu"] == 1.0


def test_meta_round_trips_through_its_dict(two_versions):
    meta = two_versions.show("t@1").meta
    assert AdapterMeta.from_dict(meta.to_dict(), "x", stored=True) == meta


def test_fifo_named_hub_json_is_skipped_without_blocking(two_versions):
    store = two_versions
    (store.root / "t" / "2" / "hub.json").unlink()
    os.mkfifo(store.root / "t" / "2" / "hub.json")
    started = time.monotonic()
    assert [v.version for v in store.list()[0].versions] == ["1"]
    assert time.monotonic() - started < 5
    assert "not a regular file" in store.list()[0].skipped[0].reason


def test_symlinks_are_refused(two_versions, tmp_path):
    store = two_versions
    os.symlink(store.root / "t", store.root / "linked")
    os.symlink(store.root / "t" / "1", store.root / "t" / "3")
    summaries = {s.name: s for s in store.list()}
    assert summaries["linked"].versions == [] and "symbolic link" in summaries["linked"].skipped[0].reason
    assert [k.ref for k in summaries["t"].skipped] == ["t@3"] and "symbolic link" in summaries["t"].skipped[0].reason
    with pytest.raises(HubError, match="symbolic link"):
        store.remove("linked")
    assert (store.root / "t" / "1").is_dir(), "the link's target is untouched"


def test_gc_removes_only_stale_leftovers(two_versions):
    store = two_versions
    stale, fresh = store.root / ".tmp-old", store.root / ".tmp-new"
    for path in (stale, fresh, store.root / ".trash-old"):
        (path / "x").mkdir(parents=True)
    old_metrics = store.root / "t" / "1" / ".hub.json.tmp-old"
    old_metrics.write_text("{}")
    hour_ago = time.time() - 3700
    for path in (stale, store.root / ".trash-old", old_metrics):
        os.utime(path, (hour_ago, hour_ago))
    removed = store.gc()
    assert sorted(p.name for p in removed) == [".hub.json.tmp-old", ".tmp-old", ".trash-old"]
    assert fresh.exists() and [v.version for v in store.list()[0].versions] == ["1", "2"]


def test_cli_lists_skipped_versions_shows_errors_in_one_line_and_collects_garbage(two_versions):
    store = two_versions
    edit_hub_json(store, "t@2", lambda d: d.pop("backbone"))
    runner = CliRunner()
    listing = runner.invoke(cli_app, ["list", "--store", str(store.root)])
    assert listing.exit_code == 0 and "skipped 2: hub.json of 't@2' lacks backbone" in listing.output
    rows = json.loads(runner.invoke(cli_app, ["list", "--store", str(store.root), "--json"]).output)
    assert rows[0]["versions"] == ["1"] and rows[0]["skipped"][0]["version"] == "2"
    shown = runner.invoke(cli_app, ["show", "t@2", "--store", str(store.root)])
    assert shown.exit_code != 0 and isinstance(shown.exception, IntegrityError)
    (store.root / ".tmp-killed").mkdir()
    gc = runner.invoke(cli_app, ["store", "gc", "--store", str(store.root), "--older-than", "0"])
    assert gc.exit_code == 0 and ".tmp-killed" in gc.output and not (store.root / ".tmp-killed").exists()


def test_serving_without_base_checks_the_backbone_named_in_hub_json(trained_run, tiny_base, other_base, tmp_path,
                                                                    monkeypatch):
    """hub.json is not checksummed: a backbone path edited to another model must be refused, not served."""
    monkeypatch.delenv("HUB_BASE", raising=False)
    store = AdapterStore(tmp_path / "store")
    store.publish(trained_run / "best", name="e2e")
    edit_hub_json(store, "e2e@1", lambda d: d["backbone"].update(source=str(other_base)))
    result = CliRunner().invoke(cli_app, ["generate", "--store", str(store.root), "--task", "e2e", "--device", "cpu",
                                          "name[The Eagle]"])
    assert result.exit_code != 0 and "is not the one it was trained on" in str(result.exception)
    edit_hub_json(store, "e2e@1", lambda d: d["backbone"].update(source=str(tiny_base)))
    result = CliRunner().invoke(cli_app, ["generate", "--store", str(store.root), "--task", "e2e", "--device", "cpu",
                                          "--max-new-tokens", "2", "name[The Eagle]"])
    assert result.exit_code == 0, result.output


def test_a_training_log_is_checksummed_like_the_payload(store, tmp_path, config_template):  # noqa: F811
    """A published train_log.json gets a sha256 in hub.json; a log changed since is refused like a payload file
    (the version is skipped with the reason), and the fsspec path's reader checks the same sha256."""
    from hub.store.versions import read_training_log

    export = make_export(tmp_path / "run", config_template)
    (export / "train_log.json").write_text(json.dumps({"steps": [{"step": 1, "loss": 2.0}]}))
    stored = store.publish(export)
    assert "train_log.json" in stored.meta.files
    assert store.training_log("t")[1]["steps"][0]["loss"] == 2.0
    log = store.root / "t" / "1" / "train_log.json"
    log.write_text(json.dumps({"steps": [{"step": 1, "loss": 0.1}]}))
    assert "train_log.json of 't@1' is corrupted" in store.list()[0].skipped[0].reason
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        read_training_log(stored, log.read_bytes)
