"""Serving sentence VAEs on the engine: the served decoder equals the plain one, VAE rows share fused batches with
E2E rows unchanged, and the /v1/vae routes answer successes and clear 4xx errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from hub.serving.batch import decode_to_completion
from hub.adapters.vae import SentenceVAE, load_vae
from hub.model.backbone import load_backbone
from hub.serving.batch import DecodeBatch
from hub.serving.engine import Engine
from hub.serving.sampling import SamplingParams
from hub.serving.vae import MAX_STEPS, VaeOps
from hub.store.local import AdapterStore
from hub.training.vae import VAETrainConfig, VAETrainer
from tasks import make_task

NZ = 4
MR = "name[The Eagle], eatType[coffee shop], food[French]"


def export_vae(tiny_base: Path, run: Path, site: str) -> Path:
    """A VAE bundle with random weights everywhere (decoder adapters and both injections do visible work)."""
    backbone = load_backbone(str(tiny_base), "cpu")
    vae = {"nz": NZ, "encoder_layers": 1, "bottleneck": 3, "injection": "both", "adapter_site": site}
    trainer = VAETrainer(backbone, VAETrainConfig.for_recipe("adavae", name="vae", data="-", base=str(tiny_base),
                                                             vae=vae, max_length=16), run)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.vae.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    trainer.export(run / "best", {})
    return run / "best"


def vae_and_e2e_store(vae_export: Path, trained_run: Path, folder: Path) -> AdapterStore:
    store = AdapterStore(folder / "store")
    store.publish(vae_export, name="vae")
    store.publish(trained_run / "best", name="e2e")
    return store


@pytest.fixture(scope="module")
def vae_export(tiny_base, tmp_path_factory) -> Path:
    return export_vae(tiny_base, tmp_path_factory.mktemp("vae-serving"), "block_output")


@pytest.fixture(scope="module")
def store(vae_export, trained_run, tmp_path_factory) -> AdapterStore:
    return vae_and_e2e_store(vae_export, trained_run, tmp_path_factory.mktemp("vae-store"))


@pytest.fixture(scope="module")
def ffn_store(tiny_base, trained_run, tmp_path_factory) -> AdapterStore:
    """The same with AdaVAE's FFN-parallel decoder adapters."""
    export = export_vae(tiny_base, tmp_path_factory.mktemp("vae-ffn"), "ffn_parallel")
    return vae_and_e2e_store(export, trained_run, tmp_path_factory.mktemp("vae-ffn-store"))


def serving_engine(tiny_base: Path, store: AdapterStore):
    backbone = load_backbone(str(tiny_base), "cpu")
    engine = Engine(backbone, make_task)
    for name in ("vae", "e2e"):
        engine.manager.add_adapter(store.load(name, backbone.fingerprint))
    return engine


@pytest.fixture
def engine(tiny_base, store):
    with serving_engine(tiny_base, store) as engine:
        yield engine


@pytest.fixture(params=["block_output", "ffn_parallel"])
def site(request, tiny_base, store, ffn_store):
    """(engine, store) for a VAE at each adapter site."""
    chosen = store if request.param == "block_output" else ffn_store
    with serving_engine(tiny_base, chosen) as engine:
        yield engine, chosen


def plain_vae(engine: Engine, store: AdapterStore) -> SentenceVAE:
    loaded = store.load("vae")
    return load_vae(loaded.adapter_tensors, loaded.meta, engine.backbone.model.config)


def record_logits(batch: DecodeBatch) -> list[torch.Tensor]:
    """Every logits matrix the batch chooses tokens from, in order."""
    seen, advance = [], batch.output.advance
    batch.output.advance = lambda logits, rows: (seen.append((logits.clone(), list(rows))), advance(logits, rows))[1]
    return seen


def test_served_decoder_equals_the_plain_decoder(site):
    """Greedy tokens and fp32 logits (≤ 1e-4) of the engine's fused path against `SentenceVAE.decoder_logits`,
    at either adapter site."""
    engine, store = site
    ops, vae = VaeOps(engine, engine.manager.resolve("vae")), plain_vae(engine, store)
    z = torch.randn(3, NZ, generator=torch.Generator().manual_seed(1))
    sequences = ops.sequences(z, SamplingParams(max_new_tokens=6))
    for s in sequences:
        assert engine.bind(s)
    batch = DecodeBatch(engine)
    seen = record_logits(batch)
    with torch.inference_mode():
        batch.join(sequences)
        while batch.busy:
            batch.step()
    eos, model = ops.eos, engine.backbone.model
    for row, sequence in enumerate(sequences):  # the plain path on the same model: the engine's hooks are idle
        tokens = sequence.output_ids
        ids = torch.tensor([[eos] + tokens])
        with torch.no_grad():
            plain = vae.decoder_logits(model, ids, torch.ones_like(ids), z[row : row + 1])[0].float()
            assert tokens == vae.greedy(model, z[row : row + 1], eos, eos, 6)[0]
        served = [logits[[s.id for s in rows].index(sequence.id)] for logits, rows in seen
                  if sequence.id in [s.id for s in rows]]
        assert len(served) == len(tokens) + (sequence.finish_reason == "stop")
        for step, logits in enumerate(served):
            vocab = plain.shape[-1] - (logits.shape[-1] - plain.shape[-1]) if logits.shape != plain[step].shape else None
            torch.testing.assert_close(logits[:vocab], plain[step][:vocab], rtol=0, atol=1e-4)


def test_vae_rows_share_a_fused_batch_with_e2e_rows(site):
    """A VAE decode in a batch mixed with E2E rows gives the same greedy tokens as alone, and so do the E2E rows."""
    engine = site[0]
    ops = VaeOps(engine, engine.manager.resolve("vae"))
    z = torch.randn(2, NZ, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(max_new_tokens=8)
    alone_vae = [s.output_ids for s in decode_to_completion(engine, ops.sequences(z, params))]
    alone_e2e = [s.output_ids for s in decode_to_completion(engine, [engine.new_sequence("e2e", MR, params)])]
    mixed = decode_to_completion(engine, [engine.new_sequence("e2e", MR, params), *ops.sequences(z, params),
                        engine.new_sequence(None, None, params, prompt_text="The")])
    assert [s.output_ids for s in mixed[1:3]] == alone_vae
    assert mixed[0].output_ids == alone_e2e[0]
    assert alone_vae[0] != alone_vae[1] or z[0].equal(z[1])  # the decoder depends on z


def test_encoder_is_served_and_deterministic(engine, store):
    ops = VaeOps(engine, engine.manager.resolve("vae"))
    codes = ops.encode(["a man walks a dog .", "two people sit ."])
    assert len(codes.mu) == 2 and len(codes.mu[0]) == NZ
    ids = torch.tensor([[ops.eos] + engine.backbone.tokenizer.encode(" a man walks a dog .") + [ops.eos]])
    with torch.no_grad():
        mu, logvar = plain_vae(engine, store).encode(engine.backbone.model, ids, torch.ones_like(ids))
    torch.testing.assert_close(torch.tensor(codes.mu[0]), mu[0], rtol=1e-5, atol=1e-5)


# -- HTTP ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tiny_base, store):
    from server.app import create_app
    from hub.serving.service import ServiceSettings

    backbone = load_backbone(str(tiny_base), "cpu")
    app = create_app(backbone, store, ServiceSettings(watch_interval=0))
    with TestClient(app) as client:
        yield client


def test_routes_answer(client):
    encoded = client.post("/v1/vae/vae/encode", json={"texts": ["a man walks a dog .", "a cat sleeps ."]})
    assert encoded.status_code == 200, encoded.text
    body = encoded.json()
    assert body["nz"] == NZ and len(body["mu"]) == 2 and len(body["logvar"][1]) == NZ
    decoded = client.post("/v1/vae/vae/decode", json={"z": body["mu"], "max_new_tokens": 5})
    assert decoded.status_code == 200 and len(decoded.json()["texts"]) == 2
    again = client.post("/v1/vae/vae/reconstruct", json={"texts": ["a man walks a dog .", "a cat sleeps ."],
                                                        "max_new_tokens": 5})
    assert again.json()["texts"] == decoded.json()["texts"]  # reconstruct = decode(μ), greedy
    path = client.post("/v1/vae/vae/interpolate", json={"a": "a man walks .", "b": "a cat sleeps .", "steps": 4,
                                                       "max_new_tokens": 5}).json()["texts"]
    assert len(path) == 4
    sample = client.post("/v1/vae/vae/sample", json={"n": 3, "seed": 7, "max_new_tokens": 5}).json()
    assert len(sample["texts"]) == 3 and len(sample["z"][0]) == NZ
    assert client.post("/v1/vae/vae/sample", json={"n": 3, "seed": 7, "max_new_tokens": 5}).json() == sample
    analogy = client.post("/v1/vae/vae/analogy", json={"a": "a man walks .", "b": "a man runs .",
                                                      "c": "a woman walks .", "max_new_tokens": 5})
    assert analogy.status_code == 200 and isinstance(analogy.json()["text"], str)
    e2e = client.post("/v1/generate", json={"task": "e2e", "input": MR, "max_new_tokens": 4})
    assert e2e.status_code == 200  # the same process serves E2E


@pytest.mark.parametrize("route, body, status, words", [
    ("/v1/vae/vae/encode", {"texts": [""]}, 422, "empty"),
    ("/v1/vae/vae/encode", {"texts": []}, 422, "between 1 and"),
    ("/v1/vae/vae/encode", {"texts": ["word " * 40]}, 422, "at most 14"),
    ("/v1/vae/vae/decode", {"z": [[0.0] * (NZ + 1)]}, 422, f"nz = {NZ}"),
    ("/v1/vae/vae/interpolate", {"a": "a", "b": "b", "steps": MAX_STEPS + 1}, 422, f"between 2 and {MAX_STEPS}"),
    ("/v1/vae/vae/sample", {"n": 1000}, 422, "between 1 and"),
    ("/v1/vae/e2e/encode", {"texts": ["a man"]}, 422, "not a sentence VAE"),
    ("/v1/vae/nope/encode", {"texts": ["a man"]}, 404, "unknown task"),
    ("/v1/generate", {"task": "vae", "input": "a man"}, 422, "sentence VAE"),
    ("/v1/completions", {"model": "vae", "prompt": "a man"}, 422, "/v1/vae/"),
])
def test_bad_requests_get_clear_4xx(client, route, body, status, words):
    response = client.post(route, json=body)
    assert response.status_code == status, response.text
    assert words in json.dumps(response.json()), response.text


def test_cli_vae_commands(store, tiny_base):
    from typer.testing import CliRunner

    from cli.main import app

    common = ["--task", "vae", "--store", str(store.root), "--base", str(tiny_base), "--device", "cpu"]

    def run(*args):
        return CliRunner().invoke(app, ["vae", *args, *common])

    encoded = run("encode", "a man walks a dog .", "a cat sleeps .")
    assert encoded.exit_code == 0, encoded.output
    mu = json.loads(encoded.output)["mu"]
    assert len(mu) == 2 and len(mu[0]) == NZ
    decoded = run("decode", json.dumps(mu), "--max-new-tokens", "4")
    assert decoded.exit_code == 0 and len(decoded.output.strip().splitlines()) <= 2, decoded.output
    assert run("sample", "-n", "3", "--seed", "1", "--max-new-tokens", "4").exit_code == 0
    path = run("interpolate", "a man walks .", "a cat sleeps .", "--steps", "3", "--max-new-tokens", "4")
    assert path.exit_code == 0, path.output
    wrong = CliRunner().invoke(app, ["vae", "decode", "[[1.0]]", *common])
    assert wrong.exit_code != 0 and f"nz = {NZ}" in str(wrong.exception)


def test_a_vae_request_the_queue_cannot_take_whole_is_refused_and_pins_nothing(tiny_base, store):
    """Sampling 5 rows with room for 3 in the queue: 429, no row queued, the VAE not pinned; a request that fits
    is then served (it used to leave the refused rows' adapter references behind for ever)."""
    from server.app import create_app
    from hub.serving.service import ServiceSettings

    app = create_app(load_backbone(str(tiny_base), "cpu"), store, ServiceSettings(watch_interval=0, max_queue=3))
    with TestClient(app) as client:
        refused = client.post("/v1/vae/vae/sample", json={"n": 5, "seed": 1, "max_new_tokens": 4})
        assert refused.status_code == 429 and "queue is full" in refused.json()["detail"]
        manager = app.state.hub.manager
        assert manager.adapters["vae"].in_use == 0 and not app.state.hub.scheduler.waiting
        assert client.post("/v1/vae/vae/sample", json={"n": 3, "seed": 1, "max_new_tokens": 4}).status_code == 200
        deadline = time.monotonic() + 5  # finished rows are released at the engine's next step
        while manager.adapters["vae"].in_use and time.monotonic() < deadline:
            time.sleep(0.01)
        assert manager.adapters["vae"].in_use == 0
