"""`hub serve` as a user runs it: a real server process on 127.0.0.1, spoken to over HTTP (httpx and the official
`openai` client), with adapters published into its store through the CLI while it runs.

Three server processes, each started once: the main one (admin token set, fast store watching) serves most tests
in file order; a second without an admin token, with a one-place queue and one resident adapter, checks 403, 429,
LRU eviction and waiting for a busy slot; a third is stopped with SIGTERM while requests are in flight. Every loop here is bounded and
every process is stopped at teardown.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app as cli_app

REPO = Path(__file__).resolve().parents[1]
HUB = ([sys.executable, "-m", "hub"] if importlib.util.find_spec("hub.__main__")
       else [sys.executable, "-c", "from cli.main import main; main()"])
ADMIN_TOKEN = "secret"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READY_TIMEOUT = 60.0
HOT_PUBLISH_WITHIN = 3.0  # the server polls its store every 0.2 s
CONTEXT = 128  # n_positions of the tiny GPT-2 in conftest

MR = "name[The Eagle], eatType[coffee shop], food[French]"
SHORT_MR = "name[The Eagle], food[French]"
MRS = [
    MR,
    SHORT_MR,
    "name[Alimentum], area[city centre], familyFriendly[no]",
    "name[Blue Spice], priceRange[cheap], near[Rainbow Vegetarian Café]",
    "name[The Mill], customer rating[5 out of 5], area[riverside], food[Italian], near[Café Sicilia]",
    "name[Zizzi]",
]
SAME = ("e2e", "e2e-b", "e2e-c")  # `trained_run` published under three names
OTHER = "e2e-x"  # an adapter with other weights (`second_run`)
TASKS = (*SAME, OTHER)


# -- helpers ------------------------------------------------------------------------------------------------------
def publish(run_dir: Path, store: Path, name: str, version: str | None = None) -> None:
    args = ["publish", str(run_dir), "--store", str(store), "--name", name]
    result = CliRunner().invoke(cli_app, args + (["--version", version] if version else []))
    assert result.exit_code == 0, result.output


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


class Server:
    """One `hub serve` subprocess on a free loopback port; its output goes to a log file."""

    def __init__(self, store: Path, base: Path, log: Path, *options: str, admin_token: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("HUB_ADMIN_TOKEN", None)
        if admin_token is not None:
            env["HUB_ADMIN_TOKEN"] = admin_token
        command = [*HUB, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--store", str(store),
                   "--base", str(base), "--device", "cpu", *options]
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(f"hub serve exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"hub serve not ready within {timeout:g}s:\n{self.log_text()[-4000:]}")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


def start_server(tmp: Path, store: Path, base: Path, *options: str, admin_token: str | None = None) -> Server:
    server = Server(store, base, tmp / "serve.log", *options, admin_token=admin_token)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def gen(client: httpx.Client, task: str = "e2e", input=MR, **fields) -> httpx.Response:
    return client.post("/v1/generate", json={"task": task, "input": input, **fields})


def sse_data(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def metric_samples(client: httpx.Client) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def task_names(client: httpx.Client) -> list[str]:
    response = client.get("/v1/tasks")
    assert response.status_code == 200
    return [t["name"] for t in response.json()["tasks"]]


def wait_for_task(client: httpx.Client, name: str, timeout: float = HOT_PUBLISH_WITHIN) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
        if name in tasks:
            return tasks[name]
        if time.monotonic() > deadline:
            pytest.fail(f"{name!r} not served {timeout:g}s after publishing; tasks: {sorted(tasks)}")
        time.sleep(0.05)


def wait_for_version(client: httpx.Client, name: str, version: str, timeout: float = HOT_PUBLISH_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while (current := wait_for_task(client, name, timeout)["version"]) != version:
        if time.monotonic() > deadline:
            pytest.fail(f"{name!r} still serves version {current!r} {timeout:g}s after {version!r} was published")
        time.sleep(0.05)


def wait_until_gone(client: httpx.Client, name: str, timeout: float = HOT_PUBLISH_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while name in task_names(client):
        if time.monotonic() > deadline:
            pytest.fail(f"{name!r} still served {timeout:g}s after its removal from the store")
        time.sleep(0.05)


# -- fixtures -----------------------------------------------------------------------------------------------------
def train(base: Path, data: Path, out: Path, *options: str) -> Path:
    result = CliRunner().invoke(cli_app, ["train", "e2e", "--base", str(base), "--data", str(data), "--batch-size",
                                          "2", "--grad-accum", "1", "--device", "cpu", "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def second_run(tiny_base, e2e_dir, tmp_path_factory) -> Path:
    """Another e2e adapter on `tiny_base` whose outputs differ from `trained_run`'s: mixed batches must keep them
    apart."""
    return train(tiny_base, e2e_dir, tmp_path_factory.mktemp("runs-second") / "e2e", "--max-steps", "3",
                 "--lr", "0.05", "--seed", "1")


@pytest.fixture(scope="module")
def other_run(other_base, e2e_dir, tmp_path_factory) -> Path:
    """An e2e adapter trained on `other_base`: same shapes, other backbone weights."""
    return train(other_base, e2e_dir, tmp_path_factory.mktemp("runs-other") / "e2e", "--max-steps", "1")


@pytest.fixture(scope="module")
def store(trained_run, second_run, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("served") / "store"
    for name in SAME:
        publish(trained_run, store, name)
    publish(second_run, store, OTHER)
    return store


@pytest.fixture(scope="module")
def server(store, tiny_base, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("serve-main"), store, tiny_base, "--watch-interval", "0.2",
                          admin_token=ADMIN_TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    http = httpx.Client(timeout=30.0, trust_env=False)
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, http_client=http)
    http.close()


@pytest.fixture(scope="module")
def small_server(trained_run, second_run, tiny_base, tmp_path_factory):
    """No HUB_ADMIN_TOKEN; one request decoded at a time and one waiting; one adapter resident at a time."""
    tmp = tmp_path_factory.mktemp("serve-small")
    publish(trained_run, tmp / "store", "e2e")
    publish(second_run, tmp / "store", OTHER)
    server = start_server(tmp, tmp / "store", tiny_base, "--max-batch", "1", "--max-queue", "1",
                          "--max-resident", "1")
    yield server
    server.stop()


# -- health, listing ----------------------------------------------------------------------------------------------
def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == client.get("/health").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "tasks": len(TASKS)}


def test_tasks_lists_every_published_adapter_with_its_metadata(client, trained_run):
    meta = json.loads((trained_run / "best" / "adapter_meta.json").read_text())
    tasks = client.get("/v1/tasks").json()["tasks"]
    assert [t["name"] for t in tasks] == list(TASKS)
    assert all(task["resident"] for task in tasks)
    for task in tasks:
        assert task["version"] == "1" and task["versions"] == ["1"]
        assert task["task_type"] == "e2e"
        assert task["bottleneck"] == meta["bottleneck"]
        assert task["trainable_pct"] == pytest.approx(meta["trainable_pct"])
        assert 0 < task["trainable_pct"] < 100


def test_tasks_answers_the_same_fields_under_ray(client, store):
    """`/v1/tasks` of `hub serve --ray` (`RemoteService`, before any replica reported) lists what `hub serve` does,
    plus the replicas that served each task."""
    pytest.importorskip("ray")
    from fastapi.testclient import TestClient

    from hub.store.local import AdapterStore
    from server.app import build_app
    from server.ray.ingress import RemoteService
    from server.ray.options import RayServeOptions

    here = client.get("/v1/tasks").json()["tasks"]
    remote = RemoteService(None, AdapterStore(store), RayServeOptions(store=str(store)))
    with TestClient(build_app(remote)) as ray_client:
        under_ray = ray_client.get("/v1/tasks").json()["tasks"]
    assert [set(t) for t in under_ray] == [set(t) | {"replicas"} for t in here]
    assert [{**t, "resident": True, "replicas": []} for t in here] == [{**t, "resident": True} for t in under_ray]
    assert not any(t["resident"] for t in under_ray)


def test_models_lists_the_tasks(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(TASKS)
    assert all(m["object"] == "model" for m in body["data"])


# -- /v1/generate -------------------------------------------------------------------------------------------------
def test_generate_returns_text_with_usage(client):
    response = gen(client, max_new_tokens=8)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "e2e" and body["version"] == "1"
    assert isinstance(body["text"], str) and body["text"]
    assert body["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] > 0
    assert 0 < body["usage"]["completion_tokens"] <= 8
    if body["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 8


def test_min_tokens_and_ignore_eos_on_every_route(client, openai_client):
    fixed = gen(client, max_new_tokens=9, ignore_eos=True).json()
    assert fixed["finish_reason"] == "length" and fixed["usage"]["completion_tokens"] == 9
    assert gen(client, max_new_tokens=12, min_tokens=7).json()["usage"]["completion_tokens"] >= 7
    completion = openai_client.completions.create(model="e2e", prompt=MR, max_tokens=9, temperature=0,
                                                  extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 9 and completion.choices[0].text == fixed["text"]
    chat = openai_client.chat.completions.create(model="e2e", messages=[{"role": "user", "content": MR}],
                                                 max_tokens=12, extra_body={"min_tokens": 7})
    assert chat.usage.completion_tokens >= 7
    too_many = gen(client, max_new_tokens=4, min_tokens=5)
    assert too_many.status_code == 422 and "min_tokens" in too_many.json()["detail"]


def test_greedy_generation_is_deterministic(client):
    first, second = (gen(client, "e2e-b", MRS[2], max_new_tokens=10).json() for _ in range(2))
    assert first == second


def test_concurrent_requests_for_all_tasks_are_fused_and_match_solo_results(client):
    requests = [{"task": TASKS[i % len(TASKS)], "input": MRS[i % len(MRS)], "max_new_tokens": 4 + (i * 5) % 17}
                for i in range(16)]
    solo = [client.post("/v1/generate", json=r).json() for r in requests]
    answers = {task: gen(client, task, max_new_tokens=8).json()["text"] for task in ("e2e", OTHER)}
    assert answers["e2e"] != answers[OTHER], "precondition: the two trained adapters answer differently"
    barrier = threading.Barrier(len(requests))

    def send(request):
        barrier.wait(timeout=10)
        return client.post("/v1/generate", json=request)

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(send, requests))
    assert [r.status_code for r in responses] == [200] * len(requests), [r.text for r in responses]
    for request, response, alone in zip(requests, responses, solo):
        body = response.json()
        assert body["task"] == request["task"]
        assert body["usage"]["completion_tokens"] <= request["max_new_tokens"]
        # greedy decoding in a mixed, left-padded batch gives what the request gets alone
        assert body == alone


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(client):
    greedy = gen(client, "e2e-c", MRS[4], max_new_tokens=10).json()
    sampled = [gen(client, "e2e-c", MRS[4], max_new_tokens=10, temperature=1.5, seed=7).json() for _ in range(2)]
    assert sampled[0] == sampled[1]
    for narrow in ({"top_k": 1}, {"top_p": 1e-6}):  # one candidate token left: sampling is greedy
        body = gen(client, "e2e-c", MRS[4], max_new_tokens=10, temperature=1.5, seed=3, **narrow).json()
        assert body == greedy, narrow


def test_unknown_task_is_404_listing_the_available_tasks(client):
    response = gen(client, "no-such-task")
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert "no-such-task" in detail
    assert all(name in detail for name in TASKS)


@pytest.mark.parametrize("body, field", [
    ({"task": "e2e"}, "input"),
    ({"input": MR}, "task"),
    ({"task": "e2e", "input": MR, "temperature": -1}, "temperature"),
    ({"task": "e2e", "input": MR, "max_new_tokens": 0}, "max_new_tokens"),
    ({"task": "e2e", "input": MR, "max_new_tokens": "many"}, "max_new_tokens"),
    ({"task": "e2e", "input": MR, "top_p": 0}, "top_p"),
    ({"task": "e2e", "input": MR, "stop": "."}, "stop"),
    ({"task": "e2e", "input": 42}, "input"),
    ({"task": ["e2e"], "input": MR}, "task"),
], ids=["missing-input", "missing-task", "negative-temperature", "zero-max-new-tokens", "max-new-tokens-str",
        "zero-top-p", "stop-not-a-list", "input-int", "task-list"])
def test_invalid_fields_are_422_naming_the_field(client, body, field):
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(field in error["loc"] for error in errors), errors


def test_body_that_is_not_json_is_422(client):
    response = client.post("/v1/generate", content=b"task=e2e", headers={"content-type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize("value, words", [
    ("garbage", ["not an E2E meaning representation", "garbage", "name[The Eagle]"]),
    ("name[The Eagle], colour[red]", ["unknown E2E slot", "colour"]),
    ("", ["non-empty string"]),
    ({"name": "The Eagle"}, ["non-empty string"]),
])
def test_malformed_e2e_input_is_422_with_a_clear_message(client, value, words):
    response = gen(client, input=value)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for word in words:
        assert word in detail


def test_input_longer_than_the_context_is_422_stating_the_limit(client):
    response = gen(client, input=f"name[{'The Very Long Eagle ' * 60}], food[French]", max_new_tokens=8)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "too long" in detail and str(CONTEXT) in detail


def test_max_new_tokens_beyond_the_context_is_422_stating_the_limit(client):
    response = gen(client, max_new_tokens=CONTEXT + 100)
    assert response.status_code == 422
    assert str(CONTEXT) in response.json()["detail"]


def _stream_generate(client: httpx.Client, **fields) -> tuple[list[str], dict]:
    with client.stream("POST", "/v1/generate", json={"task": "e2e", "input": MR, **fields, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(data) for data in sse_data(r)]
    *pieces, final = events
    assert all(set(e) == {"text"} for e in pieces), events
    return [e["text"] for e in pieces], final


def test_streaming_generate_sends_tokens_then_a_final_event(client):
    plain = gen(client, max_new_tokens=12).json()
    pieces, final = _stream_generate(client, max_new_tokens=12)
    assert final["finish_reason"] == plain["finish_reason"]
    assert final["usage"] == plain["usage"]
    assert final["task"] == "e2e" and final["version"] == "1"
    # an event per decoded token (several may be coalesced when the client lags behind the engine)
    assert 1 <= len(pieces) <= final["usage"]["completion_tokens"]
    assert all(pieces)
    assert "".join(pieces) == plain["text"]


# -- OpenAI-compatible routes with the official client ------------------------------------------------------------
def test_openai_completion(openai_client, client):
    completion = openai_client.completions.create(model="e2e", prompt=MR, max_tokens=8, temperature=0)
    assert completion.object == "text_completion" and completion.model == "e2e"
    choice = completion.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= 8 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert choice.text == gen(client, max_new_tokens=8).json()["text"]


def test_openai_streamed_completion_joins_to_the_plain_one(openai_client):
    plain = openai_client.completions.create(model="e2e", prompt=MR, max_tokens=8, temperature=0)
    chunks = list(openai_client.completions.create(model="e2e", prompt=MR, max_tokens=8, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_openai_chat_completion_plain_and_streamed(openai_client):
    messages = [{"role": "system", "content": "Describe the restaurant."}, {"role": "user", "content": MR}]
    chat = openai_client.chat.completions.create(model="e2e", messages=messages, max_tokens=8, temperature=0)
    assert chat.object == "chat.completion"
    message = chat.choices[0].message
    assert message.role == "assistant" and message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert 0 < chat.usage.completion_tokens <= 8

    chunks = list(openai_client.chat.completions.create(model="e2e", messages=messages, max_tokens=8,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" and c.model == "e2e" for c in chunks)


def test_openai_stop_strings_cut_the_text_in_both_modes(openai_client):
    full = openai_client.completions.create(model="e2e-b", prompt=MRS[2], max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    cut = openai_client.completions.create(model="e2e-b", prompt=MRS[2], max_tokens=12, temperature=0, stop=stop)
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    chunks = list(openai_client.completions.create(model="e2e-b", prompt=MRS[2], max_tokens=12, temperature=0,
                                                   stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_openai_errors(openai_client, client):
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="no-such-task", prompt=MR, max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError):
        openai_client.chat.completions.create(model="e2e", messages=[{"role": "user", "content": "garbage"}],
                                              max_tokens=4)
    response = client.post("/v1/completions", json={"model": "e2e", "prompt": [MR] * 65, "max_tokens": 4})
    assert response.status_code == 422 and "prompt" in str(response.json()["detail"])


# -- metrics ------------------------------------------------------------------------------------------------------
def test_metrics_count_requests_and_tokens(client):
    assert gen(client, max_new_tokens=3).status_code == 200
    before = metric_samples(client)
    body = gen(client, "e2e-b", MRS[3], max_new_tokens=5).json()
    after = metric_samples(client)
    task = (("task", "e2e-b"),)
    assert after[("hub_requests_total", task)] - before.get(("hub_requests_total", task), 0) == 1
    generated = after[("hub_generated_tokens_total", task)] - before.get(("hub_generated_tokens_total", task), 0)
    assert generated == body["usage"]["completion_tokens"]
    assert after[("hub_requests_total", (("task", "e2e"),))] >= 1
    assert after[("hub_generated_tokens_total", (("task", "e2e"),))] >= 3
    assert after[("hub_time_to_first_token_seconds_count", task)] >= 1
    assert after[("hub_resident_adapters", ())] == len(task_names(client))
    # the gauges are sampled when scraped: a finished sequence leaves the running batch at the engine's next step
    deadline = time.monotonic() + 2
    while (gauges := [after[("hub_queue_depth", ())], after[("hub_running_batch_size", ())]]) != [0, 0]:
        assert time.monotonic() < deadline, f"an idle server reports waiting/running {gauges}"
        time.sleep(0.05)
        after = metric_samples(client)


# -- the store while serving --------------------------------------------------------------------------------------
def test_hot_published_adapter_is_served_without_restart(client, store, trained_run):
    publish(trained_run, store, "e2e-d")
    task = wait_for_task(client, "e2e-d")
    assert task["version"] == "1"
    response = gen(client, "e2e-d", max_new_tokens=4)
    assert response.status_code == 200 and response.json()["task"] == "e2e-d"


def test_newer_version_replaces_the_served_one(client, store, trained_run):
    wait_for_task(client, "e2e-d")
    publish(trained_run, store, "e2e-d", version="2")
    wait_for_version(client, "e2e-d", "2")
    body = gen(client, "e2e-d", max_new_tokens=4).json()
    assert body["version"] == "2"
    assert [t for t in client.get("/v1/tasks").json()["tasks"] if t["name"] == "e2e-d"][0]["versions"] == ["1", "2"]


def test_adapter_removed_from_the_store_is_unloaded(client, store, trained_run):
    publish(trained_run, store, "e2e-gone")
    wait_for_task(client, "e2e-gone")
    result = CliRunner().invoke(cli_app, ["rm", "e2e-gone", "--store", str(store)])
    assert result.exit_code == 0, result.output
    wait_until_gone(client, "e2e-gone")
    assert gen(client, "e2e-gone").status_code == 404
    assert gen(client, "e2e", max_new_tokens=4).status_code == 200


def test_corrupt_adapters_are_refused_while_the_others_keep_serving(client, store, trained_run, tmp_path):
    staging = tmp_path / "staging"  # corrupted before it enters the watched store, then moved in atomically
    publish(trained_run, staging, "e2e-corrupt")
    publish(trained_run, staging, "e2e-b", version="2")  # a corrupt newer version of a served name
    for version_dir in (staging / "e2e-corrupt" / "1", staging / "e2e-b" / "2"):
        flip_last_byte(version_dir / "adapter.safetensors")
    os.rename(staging / "e2e-corrupt", store / "e2e-corrupt")
    os.rename(staging / "e2e-b" / "2", store / "e2e-b" / "2")
    publish(trained_run, store, "sentinel-1")  # once it is served, the server has seen the corrupt ones
    wait_for_task(client, "sentinel-1")

    tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert "e2e-corrupt" not in tasks
    assert tasks["e2e-b"]["version"] == "1"  # the newest good version keeps serving
    assert gen(client, "e2e-corrupt").status_code == 404
    for name in ("e2e", "e2e-b"):
        response = gen(client, name, max_new_tokens=4)
        assert response.status_code == 200 and response.json()["version"] == "1"


def test_with_a_bounded_cpu_tier_weights_are_read_when_needed_and_a_damaged_file_fails_only_its_requests(
        trained_run, second_run, tiny_base, tmp_path):
    """`--max-cpu-adapters 0 --max-resident 1`: start-up reads no weights; each request reads its adapter from the
    store; a file damaged after start-up gives that task 503 with the reason, the other keeps serving."""
    store = tmp_path / "store"
    publish(trained_run, store, "e2e")
    publish(second_run, store, OTHER)
    server = start_server(tmp_path, store, tiny_base, "--max-cpu-adapters", "0", "--max-resident", "1",
                          "--watch-interval", "0")
    try:
        with server.client() as client:
            tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
            assert not any(t["resident"] for t in tasks.values()), "nothing read at start-up"
            first = {name: gen(client, name, max_new_tokens=4) for name in ("e2e", OTHER)}
            assert all(r.status_code == 200 for r in first.values())
            flip_last_byte(store / "e2e" / "1" / "adapter.safetensors")  # e2e is off the device after OTHER ran
            damaged = gen(client, "e2e", max_new_tokens=4)
            assert damaged.status_code == 503 and "sha256" in damaged.json()["detail"]
            again = gen(client, OTHER, max_new_tokens=4)
            assert again.status_code == 200 and again.json()["text"] == first[OTHER].json()["text"]
    finally:
        server.stop()


def widen_task_rows(version_dir: Path, extra: int = 7) -> None:
    """Rewrite a stored version's task-token rows `extra` columns wider, with checksums that match again."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    rows_file = version_dir / "task_tokens.safetensors"
    rows = load_file(rows_file)["rows"]
    save_file({"rows": torch.cat([rows, torch.zeros(rows.shape[0], extra)], dim=1)}, rows_file)
    meta = json.loads((version_dir / "hub.json").read_text())
    meta["files"]["task_tokens.safetensors"] = hashlib.sha256(rows_file.read_bytes()).hexdigest()
    (version_dir / "hub.json").write_text(json.dumps(meta))


def test_task_rows_wider_than_the_backbone_fail_their_requests_and_the_server_stays_ready(
        trained_run, second_run, tiny_base, tmp_path):
    """Such a version (checksums valid) used to kill the engine thread: every later request to any task ended in
    504 while /readyz said ready. Now its requests get 503 with the reason, and everything else is served."""
    store = tmp_path / "store"
    publish(trained_run, store, "e2e")
    publish(second_run, store, OTHER)
    widen_task_rows(store / OTHER / "1")
    server = start_server(tmp_path, store, tiny_base, "--max-cpu-adapters", "0", "--watch-interval", "0")
    try:
        with server.client() as client:
            for _ in range(2):
                wide = gen(client, OTHER, max_new_tokens=4)
                assert wide.status_code == 503 and "task_tokens.safetensors" in wide.json()["detail"]
                assert gen(client, "e2e", max_new_tokens=4).status_code == 200
            assert client.get("/readyz").status_code == 200
            assert metric_samples(client)[("hub_ready", ())] == 1.0
    finally:
        server.stop()


def test_adapter_of_another_backbone_is_refused(client, store, other_run, trained_run):
    publish(other_run, store, "e2e-other")
    publish(trained_run, store, "sentinel-2")
    wait_for_task(client, "sentinel-2")
    assert "e2e-other" not in task_names(client)
    assert gen(client, "e2e-other").status_code == 404
    assert gen(client, "e2e", max_new_tokens=4).status_code == 200


# -- admin --------------------------------------------------------------------------------------------------------
def test_admin_reload_needs_the_token(client):
    missing = client.post("/v1/admin/reload")
    assert missing.status_code == 401 and missing.headers.get("www-authenticate") == "Bearer"
    assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/admin/reload", headers={"Authorization": ADMIN_TOKEN}).status_code == 401
    response = client.post("/v1/admin/reload", headers=AUTH)
    assert response.status_code == 200
    assert set(response.json()) == {"loaded", "unloaded", "refused"}


def test_admin_unload_keeps_a_task_away_until_a_newer_version(client, store, trained_run):
    assert client.delete("/v1/admin/adapters/e2e-c").status_code == 401
    assert "e2e-c" in task_names(client)
    response = client.delete("/v1/admin/adapters/e2e-c", headers=AUTH)
    assert response.status_code == 200 and response.json() == {"unloaded": "e2e-c"}
    assert gen(client, "e2e-c").status_code == 404
    assert "e2e-c" not in task_names(client)
    assert client.post("/v1/admin/reload", headers=AUTH).status_code == 200
    assert "e2e-c" not in task_names(client)  # still published, but unloaded by the operator
    assert client.delete("/v1/admin/adapters/e2e-c", headers=AUTH).status_code == 404
    assert gen(client, "e2e", max_new_tokens=4).status_code == 200

    publish(trained_run, store, "e2e-c", version="2")
    assert wait_for_task(client, "e2e-c")["version"] == "2"
    assert gen(client, "e2e-c", max_new_tokens=4).json()["version"] == "2"


def test_admin_routes_are_off_without_a_configured_token(small_server):
    with small_server.client() as client:
        assert client.post("/v1/admin/reload").status_code == 403
        forbidden = client.post("/v1/admin/reload", headers=AUTH)
        assert forbidden.status_code == 403 and "HUB_ADMIN_TOKEN" in forbidden.json()["detail"]
        assert client.delete("/v1/admin/adapters/e2e", headers=AUTH).status_code == 403
        assert task_names(client) == ["e2e", OTHER]


# -- load and shutdown --------------------------------------------------------------------------------------------
def test_full_queue_answers_429_with_retry_after(small_server):
    n = 8
    barrier = threading.Barrier(n)
    with small_server.client() as client:
        def send(_):
            barrier.wait(timeout=10)
            return gen(client, input=SHORT_MR, max_new_tokens=100)

        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(send, range(n)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429}, codes
        for response in responses:
            if response.status_code == 429:
                assert response.headers["retry-after"] == "1"
                assert "queue is full" in response.json()["detail"]
            else:
                assert 0 < response.json()["usage"]["completion_tokens"] <= 100
        assert gen(client, max_new_tokens=4).status_code == 200  # and it serves again once drained


def test_lru_eviction_serves_every_task_from_one_resident_slot(small_server, client):
    with small_server.client() as small:
        for task in ("e2e", OTHER, "e2e", OTHER, OTHER, "e2e"):
            for mr in (MR, MRS[4]):
                body = {"task": task, "input": mr, "max_new_tokens": 6}
                evicting = small.post("/v1/generate", json=body)
                assert evicting.status_code == 200
                assert evicting.json() == client.post("/v1/generate", json=body).json()  # all resident there
            tasks = small.get("/v1/tasks").json()["tasks"]
            assert [t["name"] for t in tasks if t["resident"]] == [task]
        assert metric_samples(small)[("hub_resident_adapters", ())] == 1


def test_a_request_for_a_busy_slot_waits_in_the_queue(small_server):
    """One resident slot, held by a decoding e2e request: a request for another adapter waits (as in vLLM)
    instead of being refused, and is served once the slot frees."""
    with small_server.client() as small:
        body = {"task": "e2e", "input": SHORT_MR, "max_new_tokens": 100, "stream": True}
        with small.stream("POST", "/v1/generate", json=body) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # e2e holds the only slot while decoding
            waited = gen(small, OTHER, max_new_tokens=4)
            rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(rest[-1][len("data: "):])["finish_reason"] in ("stop", "length")
        assert waited.status_code == 200, waited.text
        assert 0 < waited.json()["usage"]["completion_tokens"] <= 4
        assert [t["name"] for t in small.get("/v1/tasks").json()["tasks"] if t["resident"]] == [OTHER]


@pytest.fixture(scope="module")
def sigterm_outcome(trained_run, tiny_base, tmp_path_factory) -> dict:
    """SIGTERM a server (one sequence decoded at a time) while a stream and queued requests are in flight."""
    tmp = tmp_path_factory.mktemp("serve-sigterm")
    publish(trained_run, tmp / "store", "e2e")
    server = start_server(tmp, tmp / "store", tiny_base, "--max-batch", "1")
    queued = 3
    results: dict[int, tuple[int, dict, float]] = {}

    try:
        with server.client() as client:
            def send(i):
                response = gen(client, input=SHORT_MR, max_new_tokens=100)
                results[i] = (response.status_code, response.json(), time.monotonic())

            body = {"task": "e2e", "input": SHORT_MR, "max_new_tokens": 110, "stream": True}
            with client.stream("POST", "/v1/generate", json=body) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))  # decoding has begun
                threads = [threading.Thread(target=send, args=(i,)) for i in range(queued)]
                for thread in threads:
                    thread.start()
                deadline = time.monotonic() + 10
                while metric_samples(client).get(("hub_requests_total", (("task", "e2e"),)), 0) < queued + 1:
                    assert time.monotonic() < deadline, "the queued requests never reached the server"
                    time.sleep(0.005)
                signalled = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                events = [first] + [line for line in lines if line.startswith("data: ")]
                stream_status = stream.status_code
            for thread in threads:
                thread.join(timeout=30)
        try:
            returncode = server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            returncode = None
    finally:
        server.stop()
    return {"events": [json.loads(e[len("data: "):]) for e in events], "stream_status": stream_status,
            "results": results, "queued": queued, "signalled": signalled, "returncode": returncode,
            "log": server.log_text()}


def test_sigterm_finishes_in_flight_requests_then_exits(sigterm_outcome):
    outcome = sigterm_outcome
    assert outcome["returncode"] is not None, "the server did not exit within 30 s of SIGTERM"
    assert outcome["stream_status"] == 200
    final = outcome["events"][-1]
    assert final["finish_reason"] in ("stop", "length") and final["usage"]["completion_tokens"] > 0
    assert len(outcome["results"]) == outcome["queued"]
    for status, body, _ in outcome["results"].values():
        assert status == 200 and body["finish_reason"] in ("stop", "length")
    # requests were really in flight: some finished after the signal
    assert max(done for *_, done in outcome["results"].values()) > outcome["signalled"]
    assert "Traceback" not in outcome["log"]


def test_sigterm_exit_status_is_zero(sigterm_outcome):
    assert sigterm_outcome["returncode"] == 0
