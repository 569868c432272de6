"""`hub serve --ray` as a user runs it: a local Ray cluster with two engine replicas and six tasks in an
S3-compatible store (moto on 127.0.0.1), spoken to over HTTP on 127.0.0.1; interleaved and streaming requests,
per-task routing, mixed batches inside a replica, a task published while serving, error codes, and a clean
shutdown. One server process for the module (Ray's start-up dominates: ~60-80 s on 2 shared cores)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hub.errors import CapacityError, NotFoundError
from hub.store.backends import open_store
from tests.s3_server import s3_with_bucket, free_port

TASKS = [f"task{i}" for i in range(6)]
MR = "name[The Eagle], eatType[coffee shop], food[French]"
START_TIMEOUT_S = 150
MODEL_IDS_PUSH_S = 1.0  # replicas tell Ray's routers which tasks they hold in the background


STORE_URL = "s3://adapters/ray"


@pytest.fixture(scope="module")
def s3():
    yield from s3_with_bucket("adapters")


@pytest.fixture(scope="module")
def store(s3, trained_run, tmp_path_factory):
    adapters = open_store(STORE_URL, cache_dir=tmp_path_factory.mktemp("cache"), **s3.storage_options)
    for name in TASKS:
        adapters.publish(trained_run / "best", name=name)
    return adapters


@pytest.fixture(scope="module")
def server(s3, store, tiny_base, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray-log") / "server.log"
    command = [sys.executable, "-m", "hub", "serve", "--ray", "--replicas", "2", "--max-tasks-per-replica", "4",
               "--store", STORE_URL, "--base", str(tiny_base), "--device", "cpu", "--port", str(port),
               "--watch-interval", "0.2", "--max-batch", "16"]
    env = {**os.environ, **s3.environment, "OMP_NUM_THREADS": "1",
           "HUB_CACHE": str(tmp_path_factory.mktemp("replica-cache"))}
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        process.kill()
        pytest.fail(f"the Ray server did not start in {START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
    yield url, process
    stop(process, log_path)


def stop(process: subprocess.Popen, log_path: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    time.sleep(2)
    with pytest.raises(ProcessLookupError):  # Ray's own processes (raylet, GCS, workers) went with it
        os.killpg(process.pid, 0)


async def ask(client: httpx.AsyncClient, task: str, stream: bool) -> tuple[str, str, list[dict]]:
    body = {"task": task, "input": MR, "max_new_tokens": 6, "ignore_eos": True, "stream": stream}
    if not stream:
        response = await client.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        return task, response.headers["x-hub-replica"], [response.json()]
    async with client.stream("POST", "/v1/generate", json=body) as response:
        assert response.status_code == 200, await response.aread()
        events = [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: ")]
        return task, response.headers["x-hub-replica"], events


async def interleaved(url: str, rounds: int) -> list[tuple[str, str, list[dict]]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        requests = [ask(client, task, stream=(i % 2 == 1)) for i in range(rounds) for task in TASKS]
        return await asyncio.gather(*requests)


def test_interleaved_and_streaming_requests_for_six_tasks_all_answered_each_task_mostly_on_one_replica(server):
    url, _ = server
    for task in TASKS:  # one request each first: the task loads on one replica, which then reports holding it
        assert httpx.post(f"{url}/v1/generate", json={"task": task, "input": MR, "max_new_tokens": 1},
                          timeout=120).status_code == 200
    time.sleep(MODEL_IDS_PUSH_S)
    answers = asyncio.run(interleaved(url, rounds=4))
    assert len(answers) == 24
    replicas_of = collections.defaultdict(list)
    for task, replica, events in answers:
        replicas_of[task].append(replica)
        if len(events) > 1:  # streamed: one event per piece of text, then the summary
            assert sum("text" in e for e in events) >= 2, events
            assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 6
        else:
            assert events[0]["task"] == task and events[0]["usage"]["completion_tokens"] == 6
    for task, replicas in replicas_of.items():
        most = collections.Counter(replicas).most_common(1)[0][1]
        assert most >= 0.75 * len(replicas), (task, replicas)
    assert len({r for rs in replicas_of.values() for r in rs}) == 2, "both replicas served"


def test_metrics_show_mixed_batches_inside_a_replica(server):
    url, _ = server
    asyncio.run(interleaved(url, rounds=2))
    text = httpx.get(f"{url}/metrics").text
    mixed = [float(v) for v in re.findall(r'^hub_replica_mixed_steps\{replica="[^"]+"\} (\S+)$', text, re.M)]
    assert mixed and max(mixed) > 0, text
    served = re.findall(r'^hub_replica_requests_total\{replica="([^"]+)",task="([^"]+)"\} (\S+)$', text, re.M)
    assert {task for _, task, _ in served} == set(TASKS)


def test_a_task_published_while_serving_becomes_servable(server, store, trained_run):
    url, _ = server
    store.publish(trained_run / "best", name="task6")
    response = httpx.post(f"{url}/v1/generate", json={"task": "task6", "input": MR, "max_new_tokens": 3},
                          timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["task"] == "task6"
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert "task6" in {m["id"] for m in models}


def test_openai_route_and_errors_keep_their_meaning(server):
    url, _ = server
    chat = httpx.post(f"{url}/v1/completions", json={"model": "task1", "prompt": MR, "max_tokens": 3},
                      timeout=120)
    assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] in ("stop", "length")
    unknown = httpx.post(f"{url}/v1/generate", json={"task": "nope", "input": MR}, timeout=30)
    assert unknown.status_code == 404 and "task0" in unknown.json()["detail"]
    curve = httpx.get(f"{url}/v1/tasks/task1/training-curve.png", timeout=30)  # the playground reads the store
    assert curve.status_code == 200 and curve.headers["content-type"] == "image/png"
    bad = httpx.post(f"{url}/v1/generate", json={"task": "task0", "input": MR, "temperature": -1}, timeout=30)
    assert bad.status_code == 422
    too_few = httpx.post(f"{url}/v1/generate", json={"task": "task0", "input": MR, "max_new_tokens": 2,
                                                     "min_tokens": 5}, timeout=30)
    assert too_few.status_code == 422 and "min_tokens" in too_few.json()["detail"]


def test_a_composition_decodes_on_one_replica_as_in_process(server):
    """Routed by its layout task; the replica loads every member at the version the ingress resolved."""
    url, _ = server
    body = {"input": MR, "max_new_tokens": 4, "ignore_eos": True, "task": "task3",
            "compose": {"average": [{"task": "task2", "weight": 2}, {"task": "task3", "weight": 1}]}}
    answer = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["task"] == "task3" and answer.json()["composed"] == ["task2@1", "task3@1"]
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "task4", "max_tokens": 3, "compose": {"stack": ["task4", "task5"]},
        "messages": [{"role": "user", "content": MR}]})
    assert chat.status_code == 200, chat.text
    unknown = httpx.post(f"{url}/v1/generate", json={**body, "compose": {"stack": ["task3", "nope"]}}, timeout=30)
    assert unknown.status_code == 404 and "nope" in unknown.text
    too_many = {"stack": ["task0", "task1", "task2", "task3", "task4"]}
    assert httpx.post(f"{url}/v1/generate", json={**body, "compose": too_many}, timeout=30).status_code == 422


class _Events:
    """A stand-in for a Ray stream whose next event raises `error`."""

    def __init__(self, error: BaseException):
        self.error = error

    async def __anext__(self):
        raise self.error


def test_back_pressure_is_a_429_and_replica_errors_cross_as_themselves():
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from server.ray.ingress import _next_event

    with pytest.raises(CapacityError):
        asyncio.run(_next_event(_Events(BackPressureError(num_queued_requests=4, max_queued_requests=4))))
    wrapped = RayTaskError("generate", "traceback", NotFoundError("unknown task 'x'"))
    with pytest.raises(NotFoundError, match="unknown task 'x'"):
        asyncio.run(_next_event(_Events(wrapped)))


def test_app_builder_arguments_become_typed_options():
    from hub.errors import HubError
    from server.ray.options import options_from_args

    options = options_from_args({"store": "s3://b/p", "replicas": "3", "replica_gpus": "0.5", "max_batch": "8"})
    assert (options.store, options.replicas, options.replica_gpus) == ("s3://b/p", 3, 0.5)
    assert options.service.max_batch == 8 and options.service.max_queue == 256
    with pytest.raises(HubError, match="unknown: \\['replica'\\]"):
        options_from_args({"store": "s3://b/p", "replica": "3"})
    with pytest.raises(HubError, match="invalid literal"):
        options_from_args({"store": "s3://b/p", "replicas": "two"})


def test_vae_routes_are_not_mounted_under_ray_and_openapi_says_so(server):
    url, _ = server
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert not [path for path in schema["paths"] if path.startswith("/v1/vae")]
    assert "not served by this backend" in schema["info"]["description"]
    assert httpx.post(f"{url}/v1/vae/task0/encode", json={"texts": ["a man"]}, timeout=30).status_code == 404
