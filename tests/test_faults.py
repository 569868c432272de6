"""Fault suite, fast part (in-process server on the tiny GPT-2): bounded inputs, strict JSON, isolated failures,
streams that end properly, an honest OpenAPI document, store faults that stay local. Each test is one defect of
issue 11 that used to give a 5xx, hang, or hurt other requests. The slow, process-level part is `tests/faults/`
(`make faults`)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from hub.serving.batch import decode_to_completion
from hub.errors import HubError
from hub.model.backbone import load_backbone
from hub.serving import output as output_module
from hub.serving.engine import Engine, SamplingParams
from hub.serving.isolation import bisect_failing
from hub.serving.scheduler import Scheduler
from hub.store.local import AdapterStore
from hub.task import TaskCodec
from hub.serving.service import ServiceSettings
from server.app import create_app
from tasks import make_task

MR = "name[The Eagle], eatType[coffee shop], food[French]"
TOKEN = "s3cret"
BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def backbone(tiny_base):
    return load_backbone(str(tiny_base), "cpu")


@pytest.fixture(scope="module")
def store(trained_run, tmp_path_factory) -> AdapterStore:
    store = AdapterStore(tmp_path_factory.mktemp("faults") / "store")
    store.publish(trained_run / "best", name="e2e")
    return store


@pytest.fixture(scope="module")
def client(backbone, store):
    import os

    os.environ["HUB_ADMIN_TOKEN"] = TOKEN
    settings = ServiceSettings(max_batch=16, watch_interval=0, request_timeout=20)
    with TestClient(create_app(backbone, store, settings, max_body_bytes=BODY_LIMIT),
                    raise_server_exceptions=False) as client:
        yield client
    os.environ.pop("HUB_ADMIN_TOKEN", None)


def post(client, path="/v1/generate", **fields):
    body = {"task": "e2e", "input": MR, "max_new_tokens": 4, **fields} if path == "/v1/generate" else fields
    return client.post(path, json=body)


def raw(client, body: bytes, path="/v1/generate", **headers):
    return client.post(path, content=body, headers={"content-type": "application/json", **headers})


def assert_json_error(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    detail = json.dumps(response.json()["detail"])  # the body is valid JSON
    for word in words:
        assert word in detail, detail
    return detail


# -- bounds at the edge ---------------------------------------------------------------------------------------------
def test_body_over_the_limit_is_413_stating_the_limit(client):
    big = json.dumps({"task": "e2e", "input": "x" * BODY_LIMIT}).encode()
    assert_json_error(raw(client, big), 413, str(BODY_LIMIT))


def test_chunked_body_over_the_limit_is_413(client):
    chunks = iter([b'{"task": "e2e", "input": "', b"x" * BODY_LIMIT, b'"}'])
    response = client.post("/v1/generate", content=chunks, headers={"content-type": "application/json"})
    assert_json_error(response, 413, str(BODY_LIMIT))


@pytest.mark.parametrize("body, words", [
    (b'{"task": "e2e", "input": "x", "temperature": NaN}', ["NaN", "finite"]),
    (b'{"task": "e2e", "input": "x", "top_p": Infinity}', ["Infinity", "finite"]),
    (b'{"task": "e2e", "input": "x", "temperature": 1e400}', ["out of range"]),
    (b'{"task": "e2e", "input": "\\ud800"}', ["surrogate"]),
    (b'{"task": "e2e", "input": "x", "max_new_tokens": "\\ud800"}', ["surrogate"]),
    (b'{"task": "e2e", "input": {"persona": ' + b"[" * 1900 + b"]" * 1900 + b"}}", ["nested deeper than 32"]),
    (b'{"task": "e2e", "input": "\xff\xfe"}', ["not valid JSON"]),
], ids=["nan", "infinity", "overflow", "lone-surrogate-input", "lone-surrogate-int", "deep-nesting", "bad-utf8"])
def test_malformed_json_is_422_not_500(client, body, words):
    assert_json_error(raw(client, body), 422, *words)


def test_50000_nested_brackets_are_refused_without_recursion_error():
    from server.edge import BodyProblem, check_json_body

    with pytest.raises(BodyProblem, match="nested deeper than 32 levels"):
        check_json_body(b'{"input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")


@pytest.mark.parametrize("fields, words", [
    ({"seed": 2**64, "temperature": 1.0}, ["seed"]),
    ({"seed": -1, "temperature": 1.0}, ["seed"]),
    ({"stop": [""]}, ["stop", "at least 1 character"]),
    ({"stop": ["."] * 17}, ["stop", "at most 16"]),
    ({"stop": ["x" * 257]}, ["stop", "at most 256"]),
], ids=["seed-2^64", "seed-negative", "empty-stop", "17-stops", "long-stop"])
def test_field_bounds_are_422_stating_the_limit(client, fields, words):
    assert_json_error(post(client, **fields), 422, *words)


@pytest.mark.parametrize("field, value", [("best_of", 3), ("suffix", "x"), ("logit_bias", {"50": 5})])
def test_unsupported_openai_fields_are_422_naming_the_field(client, field, value):
    """logprobs, echo and the penalties are implemented now (tests/test_openai_api.py); these still are not."""
    body = {"model": "e2e", "prompt": MR, "max_tokens": 2, field: value}
    assert_json_error(client.post("/v1/completions", json=body), 422, field, "not supported")
    neutral = {"best_of": 1, "suffix": None, "logit_bias": {}}[field]
    assert client.post("/v1/completions", json={**body, field: neutral}).status_code == 200


def test_temperature_1e_45_samples_instead_of_failing(client):
    response = post(client, temperature=1e-45, seed=1)
    assert response.status_code == 200
    assert response.json()["text"] == post(client).json()["text"], "a vanishing temperature samples greedily"


# -- auth -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header, status", [
    (f"Bearer {TOKEN}", 200), (f"bearer {TOKEN}", 200), (f"BEARER  {TOKEN} ", 200),
    ("Bearer \xe9", 401), ("Basic abc", 401), ("Bearer", 401),
])
def test_admin_auth_is_case_insensitive_and_never_500(client, header, status):
    response = client.post("/v1/admin/reload", headers={"Authorization": header.encode("latin-1")})
    assert response.status_code == status, response.text
    response.json()


# -- inputs too long ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_type, source", [
    ("text2text", "word " * 3000),
    ("translate", "word " * 3000),
    ("e2e", "name[" + "Eagle " * 3000 + "]"),
])
def test_too_long_inputs_are_refused_stating_the_limit(backbone, task_type, source):
    task = make_task(task_type, {"source_lang": "en", "target_lang": "de"} if task_type == "translate" else {})
    codec = TaskCodec(task, backbone.tokenizer, backbone.vocab_size, 128)
    with pytest.raises(HubError, match="input is too long.*over the limit of 128 tokens"):
        codec.encode_request(task.parse_input(source), 8, refuse_cuts=not task.truncates_input)
    if task_type != "e2e":  # training still truncates a source text (an E2E MR cannot be cut)
        assert len(codec.encode_prompt(task.parse_input(source), 8)[0]) <= 120


def test_summarize_truncates_visibly(backbone):
    task = make_task("summarize")
    codec = TaskCodec(task, backbone.tokenizer, backbone.vocab_size, 1024)
    ids, _, dropped = codec.encode_request("word " * 1000, 130, refuse_cuts=not task.truncates_input)
    assert task.truncates_input and dropped == 600 and len(ids) == 403


def test_too_long_e2e_request_is_422(client):
    assert_json_error(post(client, input=f"name[{'Eagle ' * 400}]"), 422, "too long", "128")


# -- streams --------------------------------------------------------------------------------------------------------
def sse_events(response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("path, body", [
    ("/v1/generate", {"task": "e2e", "input": MR, "max_new_tokens": 20, "stream": True}),
    ("/v1/completions", {"model": "e2e", "prompt": MR, "max_tokens": 20, "stream": True}),
])
def test_an_error_after_the_stream_started_is_a_final_event(client, monkeypatch, path, body):
    hub = client.app.state.hub
    monkeypatch.setattr(hub.settings, "request_timeout", 0.0)  # times out at the first check: 504 in the stream
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        events = sse_events(response)
    ending = events[-2:] if path != "/v1/generate" else events[-1:]
    error = json.loads(ending[0])["error"]
    assert error["code"] == 504 and "timed out" in error["message"]
    assert path == "/v1/generate" or ending[1] == "[DONE]"


def finished_count(client, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples
               if s.name == "hub_finished_total" and s.labels.get("reason") == reason)


def test_requests_that_time_out_are_counted_as_finished(client, monkeypatch):
    before = finished_count(client, "timeout")
    monkeypatch.setattr(client.app.state.hub.settings, "request_timeout", 0.0)
    assert post(client).status_code == 504
    monkeypatch.undo()
    assert finished_count(client, "timeout") == before + 1


# -- OpenAPI --------------------------------------------------------------------------------------------------------
def test_openapi_declares_every_status_and_metrics_as_text(client):
    spec = client.get("/openapi.json").json()
    generate = spec["paths"]["/v1/generate"]["post"]["responses"]
    assert {"200", "404", "413", "422", "429", "500", "503", "504"} <= set(generate)
    assert "text/event-stream" in generate["200"]["content"]
    assert {"401", "403"} <= set(spec["paths"]["/v1/admin/reload"]["post"]["responses"])
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


# -- failure isolation in the decode loop ---------------------------------------------------------------------------
def test_bisection_finds_exactly_the_failing_items():
    calls = []

    def fails(group):
        calls.append(len(group))
        return any(i in (3, 11) for i in group)

    assert bisect_failing(list(range(16)), fails) == [3, 11]
    assert len(calls) <= 2 * 2 * 4 + 1
    assert bisect_failing(list(range(8)), lambda g: False) == []


def test_a_row_that_fails_sampling_fails_alone(backbone, store, monkeypatch):
    """A sequence whose sampling raises (seed 666 here) fails; the 8 decoded with it finish as they would alone."""
    engine = Engine(backbone, make_task)
    engine.manager.add_adapter(store.load("e2e", backbone.fingerprint))
    filtered = output_module.filtered_logits

    def poisoned(logits, params):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return filtered(logits, params)

    greedy = SamplingParams(max_new_tokens=6)
    alone = decode_to_completion(engine, [engine.new_sequence("e2e", MR, greedy)])[0]
    monkeypatch.setattr(output_module, "filtered_logits", poisoned)
    scheduler = Scheduler(engine, max_batch=16)
    done = threading.Event()
    sequences = [engine.new_sequence("e2e", MR, greedy) for _ in range(8)]
    poison = engine.new_sequence("e2e", MR, SamplingParams(max_new_tokens=6, temperature=1.0, seed=666))
    finished = []
    for sequence in [*sequences[:4], poison, *sequences[4:]]:
        sequence.on_update = lambda s: s.finished and (finished.append(s), len(finished) == 9 and done.set())
        scheduler.submit(sequence)
    scheduler.start()
    assert done.wait(60)
    scheduler.stop(10)
    assert poison.finish_reason == "error"
    assert alone.finish_reason in ("stop", "length")
    assert all((s.text, s.finish_reason) == (alone.text, alone.finish_reason) for s in sequences)
    assert all(a.in_use == 0 for a in engine.manager.adapters.values()), "every adapter reference is released"


def test_a_poison_request_amid_eight_others(client):
    with ThreadPoolExecutor(9) as pool:
        poison = pool.submit(post, client, temperature=1e-45, max_new_tokens=8)
        others = [pool.submit(post, client, max_new_tokens=8, temperature=0.7, seed=i) for i in range(8)]
        assert [f.result().status_code for f in others] == [200] * 8
        assert poison.result().status_code < 500


# -- store faults stay local ----------------------------------------------------------------------------------------
def test_a_bad_hub_json_is_skipped_and_reported_while_the_rest_serves(client, store, trained_run):
    store.publish(trained_run / "best", name="e2e")  # e2e@2
    path = store.root / "e2e" / "2" / "hub.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "backbone"}))
    store.publish(trained_run / "best", name="later")
    reload = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reload.status_code == 200 and "later@1" in reload.json()["loaded"]
    tasks = client.get("/v1/tasks").json()
    assert {t["name"]: t["version"] for t in tasks["tasks"]} == {"e2e": "1", "later": "1"}
    assert tasks["skipped"] == [{"ref": "e2e@2", "reason": "hub.json of 'e2e@2' lacks backbone"}]
    assert post(client).status_code == 200
