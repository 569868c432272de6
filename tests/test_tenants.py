"""Many users on one hub (`hub serve --keys`): 401 without a valid key, 403 for a task outside the key's scope
(the same answer whether or not the task exists), 429 with Retry-After past a quota, listings limited to the key's
tasks, admin keys, per-key and per-adapter metrics, the official `openai` client, and a keys file changed while
requests run. One server process, started once; `hub keys` through the CLI."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app as cli_app
from server.keys import KeySpec, digest, read_keys, write_keys
from server.prometheus import BoundedLabels, TierCollector
from tests.test_server import MR, OTHER, metric_samples, publish, start_server
from tests.test_server import client, second_run  # noqa: F401  (fixtures; `client` uses this module's `server`)

SECRETS = {"alice": "hub-alice-secret", "admin": "hub-admin-secret", "slow": "hub-slow-secret",
           "tok": "hub-tok-secret", "bob": "hub-bob-secret"}
ALICE_TASKS = ("e2e", "e2e-b*")


def spec(name: str, tasks: tuple[str, ...], **fields) -> KeySpec:
    return KeySpec(name, digest(SECRETS[name]), tasks, **fields)


def initial_keys() -> list[KeySpec]:
    return [spec("alice", ALICE_TASKS), spec("admin", ("*",), admin=True),
            spec("slow", ("e2e",), requests_per_second=0.2), spec("tok", ("e2e",), tokens_per_minute=6)]


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


def gen(client: httpx.Client, key: str | None, task: str = "e2e", **fields) -> httpx.Response:
    return client.post("/v1/generate", json={"task": task, "input": MR, "max_new_tokens": 4, **fields},
                       headers=auth(key) if key else {})


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    write_keys(path, initial_keys())
    return path


@pytest.fixture(scope="module")
def server(trained_run, second_run, tiny_base, keys_file, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("serve-keys")
    for name in ("e2e", "e2e-b", "e2e-c"):
        publish(trained_run, tmp / "store", name)
    publish(second_run, tmp / "store", OTHER)
    server = start_server(tmp, tmp / "store", tiny_base, "--keys", str(keys_file))
    yield server
    server.stop()


def test_without_a_valid_key_every_api_route_is_401_and_health_stays_open(client, server):
    for response in (client.get("/v1/tasks"), client.get("/v1/models"), gen(client, None),
                     client.post("/v1/completions", json={"model": "e2e", "prompt": MR},
                                 headers={"Authorization": "Bearer wrong"}),
                     client.post("/v1/admin/reload", headers={"Authorization": "Basic x"})):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/js/api.js"):
        assert client.get(path).status_code == 200, path
    assert SECRETS["alice"] not in server.log_text()


def test_a_key_lists_only_the_tasks_it_may_use(client):
    models = client.get("/v1/models", headers=auth("alice")).json()
    assert sorted(m["id"] for m in models["data"]) == ["e2e", "e2e-b"]
    tasks = client.get("/v1/tasks", headers=auth("alice")).json()["tasks"]
    assert sorted(t["name"] for t in tasks) == ["e2e", "e2e-b"]
    every = client.get("/v1/models", headers=auth("admin")).json()["data"]
    assert sorted(m["id"] for m in every) == ["e2e", "e2e-b", "e2e-c", OTHER]


def test_a_task_outside_the_scope_is_403_whether_or_not_it_exists(client):
    assert gen(client, "alice").status_code == 200
    assert gen(client, "alice", task="e2e-b").status_code == 200
    existing, missing = gen(client, "alice", task=OTHER), gen(client, "alice", task="no-such-task")
    assert existing.status_code == missing.status_code == 403
    assert existing.json()["detail"].replace(OTHER, "X") == missing.json()["detail"].replace("no-such-task", "X")
    assert "available" not in existing.text
    chat = client.post("/v1/chat/completions", headers=auth("alice"),
                       json={"model": OTHER, "messages": [{"role": "user", "content": MR}]})
    assert chat.status_code == 403
    assert client.get(f"/v1/tasks/{OTHER}/training-curve.png", headers=auth("alice")).status_code == 403
    assert client.post(f"/v1/vae/{OTHER}/encode", headers=auth("alice"), json={"texts": ["a"]}).status_code == 403
    assert gen(client, "admin", task="no-such-task").status_code == 404, "in scope, unknown: 404"


def test_admin_routes_need_a_key_marked_admin(client):
    refused = client.post("/v1/admin/reload", headers=auth("alice"))
    assert refused.status_code == 403 and "administer" in refused.json()["detail"]
    assert client.post("/v1/admin/reload", headers=auth("admin")).status_code == 200


def test_past_its_quota_a_key_gets_429_with_retry_after(client):
    assert gen(client, "slow").status_code == 200
    limited = gen(client, "slow")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "quota" in limited.json()["detail"]
    assert gen(client, "tok").status_code == 200  # admitted with credit; its ~20 tokens are charged after
    tokens = gen(client, "tok")
    assert tokens.status_code == 429 and int(tokens.headers["retry-after"]) >= 1
    assert gen(client, "alice").status_code == 200, "other keys are not limited by it"


def test_the_openai_client_with_a_key(server):
    openai = pytest.importorskip("openai")
    with httpx.Client(timeout=30.0, trust_env=False) as http:
        def client_for(key: str):
            return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, http_client=http)

        alice = client_for(SECRETS["alice"])
        completion = alice.completions.create(model="e2e", prompt=MR, max_tokens=4, temperature=0)
        assert completion.choices[0].text is not None and completion.usage.completion_tokens >= 1
        assert sorted(m.id for m in alice.models.list()) == ["e2e", "e2e-b"]
        with pytest.raises(openai.PermissionDeniedError):
            alice.completions.create(model=OTHER, prompt=MR, max_tokens=4)
        with pytest.raises(openai.AuthenticationError):
            client_for("hub-not-a-key").models.list()
        with pytest.raises(openai.RateLimitError):
            for _ in range(3):
                client_for(SECRETS["slow"]).completions.create(model="e2e", prompt=MR, max_tokens=2)


def test_metrics_count_per_key_and_per_adapter(client):
    gen(client, "alice")
    samples = metric_samples(client)
    assert samples[("hub_key_requests_total", (("key", "alice"), ("outcome", "admitted")))] >= 1
    assert samples[("hub_key_requests_total", (("key", "alice"), ("outcome", "forbidden")))] >= 1
    assert samples[("hub_key_requests_total", (("key", "slow"), ("outcome", "rate_limited")))] >= 1
    assert samples[("hub_key_tokens_total", (("key", "alice"), ("kind", "completion")))] >= 1
    assert samples[("hub_key_unauthorized_total", ())] >= 1
    assert samples[("hub_request_latency_seconds_count", (("task", "e2e"),))] >= 1
    assert samples[("hub_adapter_tier", (("task", "e2e"), ("tier", "device")))] == 1
    assert not any("secret" in str(labels) for _, labels in samples)


def test_a_changed_keys_file_applies_under_load_without_a_restart(client, server, keys_file):
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with server.client() as own:
            while not stop.is_set():
                statuses.append(gen(own, "alice").status_code)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        keys_file.write_text("[keys.alice]\nsha256 = 'not toml")  # broken: the previous keys stay
        time.sleep(2.5)
        assert gen(client, "alice").status_code == 200
        write_keys(keys_file, [*initial_keys()[1:], spec("alice", (OTHER,)), spec("bob", ("e2e",))])
        assert wait_for_status(lambda: gen(client, "bob"), 200)
        assert wait_for_status(lambda: gen(client, "alice"), 403)
        assert gen(client, "alice", task=OTHER).status_code == 200
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert statuses and set(statuses) <= {200, 403}, sorted(set(statuses))
    assert statuses[-1] == 403 and "keeping the previous keys" in server.log_text()


def wait_for_status(call, status: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if call().status_code == status:
            return True
        time.sleep(0.1)
    return False


def test_adapter_labels_are_bounded_and_the_rest_is_other():
    bound = BoundedLabels(2)
    assert [bound(n) for n in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]
    tiers = {"a": "device", "b": "cpu", "c": "store", "d": "store", "e": "device"}
    family = next(TierCollector(lambda: tiers, BoundedLabels(2)).collect())
    values = {tuple(s.labels.values()): s.value for s in family.samples}
    assert values[("a", "device")] == 1 and values[("b", "cpu")] == 1
    assert values[("other", "store")] == 2 and values[("other", "device")] == 1
    assert len({labels[0] for labels in values}) == 3


def test_hub_keys_cli_adds_lists_hashes_and_removes(tmp_path):
    path = tmp_path / "keys.toml"
    runner = CliRunner()
    added = runner.invoke(cli_app, ["keys", "add", "team-a", "--task", "e2e", "--task", "sum-*",
                                    "--tokens-per-minute", "1000", "--keys", str(path)])
    assert added.exit_code == 0, added.output
    secret = added.stdout.strip().splitlines()[-1]
    assert secret.startswith("hub-") and secret not in path.read_text()
    (stored,) = read_keys(path).values()
    assert stored.sha256 == digest(secret) and stored.tasks == ("e2e", "sum-*") and stored.tokens_per_minute == 1000
    listed = runner.invoke(cli_app, ["keys", "list", "--json", "--keys", str(path)])
    assert json.loads(listed.stdout)[0]["name"] == "team-a" and stored.sha256 not in listed.stdout
    hashed = runner.invoke(cli_app, ["keys", "hash"], input=f"{secret}\n")
    assert hashed.stdout.strip() == f'sha256 = "{stored.sha256}"'
    again = runner.invoke(cli_app, ["keys", "add", "team-a", "--task", "x", "--keys", str(path)])
    assert again.exit_code != 0
    assert runner.invoke(cli_app, ["keys", "remove", "team-a", "--keys", str(path)]).exit_code == 0
    assert read_keys(path) == {}


@pytest.mark.parametrize("text, words", [
    ("[keys.a]\nsha256 = 'abc'\n", "64 lowercase hex"),
    (f"[keys.a]\nsha256 = '{'0' * 64}'\ntasks = 'e2e'\n", "list of task names"),
    (f"[keys.a]\nsha256 = '{'0' * 64}'\nrequests_per_second = -1\n", "positive number"),
    (f"[keys.a]\nsha256 = '{'0' * 64}'\nscope = []\n", "unknown field"),
    ("[other]\n", "unknown: other"),
])
def test_a_bad_keys_file_is_refused_with_the_reason(tmp_path, text, words):
    from server.keys import KeysFileError

    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(KeysFileError, match=words):
        read_keys(path)


def test_every_routes_settings_carry_the_calling_key(keys_file):
    """Generation and sentence-VAE routes alike build their settings through `params`: the rows are the key's
    in fair admission and in its token quota."""
    from hub.serving.protocol import request_params
    from server.auth import Access, KeyRing, ScopedBackend, _caller
    from server.prometheus import ServerMetrics

    class Backend:
        params = staticmethod(request_params)

    scoped = ScopedBackend(Backend(), Access(KeyRing(keys_file), ServerMetrics().key_metrics))  # type: ignore[arg-type]
    assert scoped.params(None, max_new_tokens=3).client == ""
    token = _caller.set(spec("alice", ALICE_TASKS))
    try:
        assert scoped.params(None, max_new_tokens=3).client == "alice"
    finally:
        _caller.reset(token)
