"""Sentence VAE through the CLI and the store: train (resumable), publish, list/show, eval, checksums, backbone
check, rm; the `lm` baseline task; clear errors for bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from hub.adapters.vae import load_vae
from hub.errors import BackboneMismatchError, HubError, IntegrityError
from hub.model.backbone import load_backbone
from hub.interop import export_adapterhub
from hub.adapters.vae_kind import VAE_WEIGHTS
from hub.store.local import AdapterStore
from hub.store.format import AdapterMeta

SENTENCES = ["a man walks a dog .", "two people sit on a bench .", "a woman reads a book .", "the kids play outside .",
             "a dog runs in the park .", "a man rides a bike .", "the girl eats an apple .", "a cat sleeps ."]


def invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture(scope="module")
def sentence_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sentences")
    for split, repeat in (("train", 4), ("valid", 1), ("test", 1)):
        (folder / f"{split}.txt").write_text("\n".join(SENTENCES * repeat) + "\n")
    return folder


def train_args(base, data, out, steps=4) -> list:
    return ["train", "sentence_vae", "--base", base, "--data", data, "--max-steps", steps, "--eval-every", 2,
            "--batch-size", 4, "--bottleneck", 4, "--device", "cpu", "--out", out, "--nz", 4, "--pooling", "mean",
            "--recipe", "two-phase", "--kl-floor", "per_dim_mask", "--denoise", 0.2]


@pytest.fixture(scope="module")
def vae_run(tiny_base, sentence_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae") / "run"
    output = invoke(*train_args(tiny_base, sentence_dir, out))
    assert "recipe two-phase" in output and "KL normalised per_sentence" in output
    return out


def test_training_writes_a_resumable_run(vae_run, tiny_base, sentence_dir):
    log = json.loads((vae_run / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2, 3, 4]
    assert {"loss", "rec", "kl", "beta"} <= log["steps"][0].keys()
    assert {"neg_elbo", "rec", "kl", "au", "mi", "beta"} <= log["evals"][-1].keys()
    assert all(e["au"] in range(0, 5) for e in log["evals"])  # a count of the nz = 4 dimensions
    assert (vae_run / "vae_curves.png").stat().st_size > 0
    assert json.loads((vae_run / "best" / "train_log.json").read_text()) == log  # the export carries the log
    meta = json.loads((vae_run / "best" / "adapter_meta.json").read_text())
    assert meta["adapter_kind"] == "sentence_vae" and meta["vae"]["pooling"] == "mean"
    assert meta["training"]["kl_floor"] == "per_dim_mask" and meta["training"]["denoise"] == 0.2
    assert meta["trainable_params"] == sum(meta["parts"].values())
    output = invoke(*train_args(tiny_base, sentence_dir, vae_run, steps=6))
    assert "resuming" in output
    assert [s["step"] for s in json.loads((vae_run / "train_log.json").read_text())["steps"]] == list(range(1, 7))


def test_publish_list_show_eval_rm(vae_run, tiny_base, sentence_dir, tmp_path):
    store = tmp_path / "store"
    invoke("publish", vae_run, "--name", "snli-vae", "--store", store)
    assert "sentence_vae" in invoke("list", "--store", store)
    assert "sentence VAE: nz 4" in invoke("show", "snli-vae", "--store", store)
    output = invoke("eval", "snli-vae", "--store", store, "--data", sentence_dir, "--iw-samples", 3, "--limit", 4,
                    "--out", tmp_path / "eval")
    for name in ("ppl", "neg_elbo", "kl", "mi", "au", "recon_bleu"):
        assert f"{name} " in output
    metrics = json.loads(invoke("show", "snli-vae", "--store", store, "--json"))["metrics"]["test"]
    assert metrics["iw_samples"] == 3 and metrics["sentences"] == 4 and metrics["ppl"] > 1
    assert "removed snli-vae@1" in invoke("rm", "snli-vae", "--store", store)


def test_show_plot_draws_a_published_vaes_training_curve(vae_run, tmp_path):
    store = tmp_path / "store"
    invoke("publish", vae_run, "--name", "snli-vae", "--store", store)
    assert AdapterStore(store).training_log("snli-vae")[1]["evals"][-1]["neg_elbo"] > 0
    output = invoke("show", "snli-vae", "--store", store, "--plot", "--plot-out", tmp_path / "curve.png")
    assert "training curve written" in output
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_store_checks_checksum_and_backbone(vae_run, tiny_base, other_base, tmp_path):
    store = AdapterStore(tmp_path / "store")
    stored = store.publish(vae_run / "best")
    backbone = load_backbone(str(tiny_base), "cpu")
    loaded = store.load(stored.ref, backbone.fingerprint)
    vae = load_vae(loaded.adapter_tensors, loaded.meta, backbone.model.config)
    assert vae.config.nz == 4
    with pytest.raises(BackboneMismatchError):
        store.load(stored.ref, load_backbone(str(other_base), "cpu").fingerprint)
    tensors = dict(loaded.adapter_tensors)
    tensors.pop("mu.weight")
    with pytest.raises(IntegrityError, match="missing"):
        load_vae(tensors, loaded.meta, backbone.model.config)
    with open(stored.path / VAE_WEIGHTS, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(IntegrityError, match="corrupted"):
        store.load(stored.ref)


def test_vae_metadata_is_typed_and_validated_by_its_kind(vae_run):
    data = json.loads((vae_run / "best" / "adapter_meta.json").read_text())
    meta = AdapterMeta.from_dict(data, "x")
    assert meta.vae["pooling"] == "mean" and meta.max_length == 32 and meta.extra["recipe"] == "two-phase"
    assert meta.special_tokens == () and not meta.has_task_tokens and AdapterMeta.from_dict(meta.to_dict(), "x") == meta
    for broken, words in (({k: v for k, v in data.items() if k != "vae"}, "lacks vae"),
                          ({**data, "special_tokens": ["<a>", "<b>"]}, "has no special_tokens"),
                          ({**data, "vae": 4}, "vae must be an object"),
                          ({**data, "adapter_kind": "vlm"}, "special_tokens must be a list of at least two")):
        with pytest.raises(IntegrityError, match=words):
            AdapterMeta.from_dict(broken, "x")


def test_a_vae_is_not_exported_as_an_adapterhub_adapter(vae_run, tmp_path):
    stored = AdapterStore(tmp_path / "store").publish(vae_run / "best")
    with pytest.raises(HubError, match="sentence_vae adapter .*vae.safetensors.*not an AdapterHub adapter"):
        export_adapterhub(stored.path, tmp_path / "out")


def test_eval_a_run_before_publishing(vae_run, sentence_dir, tmp_path):
    output = invoke("eval", "--run", vae_run, "--data", sentence_dir, "--iw-samples", 2, "--limit", 2,
                    "--out", tmp_path / "e")
    assert "ppl " in output and (tmp_path / "e" / "metrics.json").is_file()


def test_lm_baseline_trains_and_is_scored_by_perplexity(tiny_base, sentence_dir, tmp_path):
    out = tmp_path / "lm"
    invoke("train", "lm", "--base", tiny_base, "--data", sentence_dir, "--max-steps", 2, "--batch-size", 4,
           "--device", "cpu", "--out", out)
    output = invoke("eval", "--run", out, "--data", sentence_dir, "--limit", 4, "--out", tmp_path / "e")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["exact"] and metrics["sentences"] == 4 and "ppl " in output
    # n_x counts <bos> x <eos>: mean log-likelihood per token relates PPL and NLL
    assert metrics["ppl"] == pytest.approx(torch.tensor(metrics["nll"] * 4 / metrics["tokens"]).exp().item(), rel=1e-4)


def test_bad_options_fail_clearly(tiny_base, sentence_dir, tmp_path):
    for extra, words in ((["--pooling", "cls"], "pooling must be one of"), (["--frobnicate", "1"], "frobnicate")):
        result = subprocess.run([sys.executable, "-m", "hub", "train", "sentence_vae", "--base", str(tiny_base),
                                 "--data", str(sentence_dir), "--device", "cpu", "--out", str(tmp_path / "x"),
                                 *extra], capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and words in result.stderr, result.stderr
    with pytest.raises(HubError, match="unknown option"):
        CliRunner().invoke(app, ["train", "e2e", "--data", str(sentence_dir), "--nz", "4"], catch_exceptions=False)
