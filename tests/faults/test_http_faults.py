"""HTTP faults against a live `hub serve`: schema fuzzing of every route, huge and poison requests next to normal
ones, malformed inputs, dropped streams, overload, SIGTERM mid-stream."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import FULL_FAULTS
from tests.faults.conftest import TAIL, Tally, cpu_seconds, p99, rss_mb, tail
from tests.test_server import MR, publish, start_server as start

NORMAL = {"task": "e2e", "input": MR, "max_new_tokens": 8}
NOISE_S = 0.05  # latency targets allow this much timer noise: the machine is shared with other jobs
FUZZ_EXAMPLES = 150 if FULL_FAULTS else 40  # per route and method


def within_twice(unloaded: list[float]) -> str:
    return f"p{TAIL} ≤ 2× unloaded + {NOISE_S * 1000:.0f} ms noise ({(2 * tail(unloaded) + NOISE_S) * 1000:.0f} ms)"


def timed(client: httpx.Client, tally: Tally, body: dict = NORMAL, path: str = "/v1/generate") -> float:
    started = time.monotonic()
    try:
        status = client.post(path, json=body).status_code
    except httpx.HTTPError:
        status = None
    tally.count(status)
    assert status == 200, status
    return time.monotonic() - started


def latencies(server, tally: Tally, n: int) -> list[float]:
    with httpx.Client(base_url=server.url, timeout=60.0, trust_env=False) as client:
        return [timed(client, tally) for _ in range(n)]


# A client of its own (another process, as an attacker would be) that sends one request body again and again.
ATTACKER = """
import sys, httpx
url, path = sys.argv[1], sys.argv[2]
body = open(path, "rb").read()
while True:
    with httpx.Client(base_url=url, timeout=60.0, trust_env=False) as client:
        try:
            status = client.post("/v1/generate", content=body, headers={"content-type": "application/json"}).status_code
        except httpx.HTTPError:
            status = 413  # the server answered 413 from Content-Length and closed before the body was sent
    print(status, flush=True)
"""


@dataclass
class Attack:
    latencies: list[float]  # of the normal requests sent meanwhile
    attacks: int  # requests the attacker had answered
    server_cpu: float  # seconds of CPU the server used meanwhile (normal requests included)


def while_attacked(body: bytes, server, tally: Tally, tmp_path, n: int = 40) -> Attack:
    """n normal requests while another process sends `body` over and over (its answers are tallied)."""
    path = tmp_path / "attack.json"
    path.write_bytes(body)
    attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, server.url, str(path)], stdout=subprocess.PIPE,
                                text=True)
    try:
        assert attacker.stdout.readline()  # the first attack has been answered
        cpu = cpu_seconds(server.process.pid)
        measured = latencies(server, tally, n)
        cpu = cpu_seconds(server.process.pid) - cpu
    finally:
        attacker.kill()
        statuses = [int(line) for line in attacker.communicate(timeout=30)[0].split()]
        for status in statuses:
            tally.count(status)
    return Attack(measured, len(statuses), cpu)


# -- schema fuzzing -------------------------------------------------------------------------------------------------
def test_schemathesis_fuzzes_every_route_without_a_5xx_or_a_schema_mismatch(server, client, tally):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings, strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    spec = client.get("/openapi.json").json()
    names = [t["name"] for t in client.get("/v1/tasks").json()["tasks"]] + ["no-such-task"]
    for model in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
        properties = spec["components"]["schemas"][model]["properties"]
        properties["task" if model == "GenerateRequest" else "model"].update(enum=names)
    schema = schemathesis.openapi.from_dict(spec)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures: list[str] = []

    def fuzzer(operation):
        @given(data=st.data())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(data):
            case = data.draw(operation.as_strategy())
            response = case.call(base_url=server.url, timeout=60)
            tally.count(response.status_code)
            try:
                case.validate_response(response, checks=checks)
            except Exception as failure:  # schemathesis reports a check failure as an exception (group)
                failures.append(f"{operation.method.upper()} {operation.path}: {failure!s:.300}")

        return fuzz

    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path != "/v1/admin/adapters/{name}":  # unloading would empty the server mid-suite
            fuzzer(operation)()
    tally.row("schemathesis, every route (task names supplied)", f"{len(failures)} failures",
              "no 5xx, status/content type/body as documented")
    assert failures == []


# -- one request must not hurt another ------------------------------------------------------------------------------
def test_huge_bodies_cost_only_their_own_time(server, client, tally, tmp_path):
    latencies(server, tally, 5)  # warm up
    cpu = cpu_seconds(server.process.pid)
    unloaded = latencies(server, tally, 40)
    unloaded_cpu = cpu_seconds(server.process.pid) - cpu
    rss_before = rss_mb(server.process.pid)
    huge = b'{"task": "e2e", "input": "' + b"x" * (20 << 20) + b'"}'
    attack = while_attacked(huge, server, tally, tmp_path)
    rss_after = rss_mb(server.process.pid)
    tally.row("normal request p99, unloaded", f"{p99(unloaded) * 1000:.0f} ms; server CPU {unloaded_cpu:.2f} s "
              "for 40 requests", "baseline")
    tally.row(f"normal request p99 while another process sends 20 MB bodies ({attack.attacks} answered 413)",
              f"{p99(attack.latencies) * 1000:.0f} ms; server CPU {attack.server_cpu:.2f} s",
              within_twice(unloaded))
    tally.row("server RSS before / after the huge bodies", f"{rss_before:.0f} / {rss_after:.0f} MB", "within 10 %")
    assert rss_after <= 1.1 * rss_before
    assert attack.server_cpu <= 2 * unloaded_cpu + 0.5, "a refused body must cost the server next to nothing"
    assert tail(attack.latencies) <= 2 * tail(unloaded) + NOISE_S


def test_poison_requests_fail_alone(server, client, tally, tmp_path):
    poisons = [{**NORMAL, "temperature": 1e-45, "seed": 1}, {**NORMAL, "temperature": 5.0, "top_p": 1e-300},
               {**NORMAL, "temperature": 1.0, "top_k": 10**12, "seed": 2**63 - 1}]

    def one_round(poison):
        with ThreadPoolExecutor(9) as pool:
            bad = pool.submit(client.post, "/v1/generate", json=poison)
            good = [pool.submit(client.post, "/v1/generate", json={**NORMAL, "temperature": 0.8, "seed": i})
                    for i in range(8)]
            statuses = [f.result().status_code for f in good]
            for status in [*statuses, bad.result().status_code]:
                tally.count(status)
        return statuses, bad.result().status_code

    outcomes = [one_round(p) for p in poisons]
    assert all(statuses == [200] * 8 and bad < 500 for statuses, bad in outcomes), outcomes
    unloaded = latencies(server, tally, 40)
    loaded = while_attacked(json.dumps(poisons[0]).encode(), server, tally, tmp_path).latencies
    tally.row("poison requests (temperature 1e-45, top_p 1e-300, top_k 10^12) amid 8 others", "8 of 8 succeed",
              "the 8 succeed")
    tally.row("normal request p99 while poison requests run", f"{p99(loaded) * 1000:.0f} ms", within_twice(unloaded))
    assert tail(loaded) <= 2 * tail(unloaded) + NOISE_S


def test_compositions_beside_plain_requests_all_succeed(server, client, tally):
    """Averages and stacks of both adapters, with extreme but valid weights, decode in the batch beside plain
    requests; every one answers 200 and the plain answers stay what they are alone."""
    alone = client.post("/v1/generate", json=NORMAL).json()["text"]
    compositions = [{"average": [{"task": "e2e", "weight": 1e-300}, {"task": "e2e-b", "weight": 1e300}]},
                    {"stack": ["e2e-b", "e2e"]}, {"average": [{"task": "e2e"}, {"task": "e2e-b"}]}]
    with ThreadPoolExecutor(8) as pool:
        composed = [pool.submit(client.post, "/v1/generate", json={"input": MR, "max_new_tokens": 8, "compose": c})
                    for c in compositions * 4]
        plain = [pool.submit(client.post, "/v1/generate", json=NORMAL) for _ in range(12)]
        answers = [f.result() for f in composed + plain]
    for answer in answers:
        tally.count(answer.status_code)
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers if a.status_code != 200]
    assert {a.json()["text"] for a in answers[len(composed):]} == {alone}
    tally.row("12 composed requests (average with weights 1e-300/1e300, stack) amid 12 plain ones", "24 of 24 succeed",
              "all 200; plain answers unchanged")


MALFORMED = [
    b'{"task": "e2e", "input": "x", "temperature": NaN}', b'{"task": "e2e", "input": "x", "top_p": Infinity}',
    b'{"task": "e2e", "input": "x", "temperature": 1e999}', b'{"task": "e2e", "input": "\\ud800"}',
    b'{"task": "e2e", "input": "x", "max_new_tokens": "\\udfff"}', b'{"task": "e2e", "input": "x", "seed": 18446744073709551616, "temperature": 1}',
    b'{"task": "e2e", "input": {"persona": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
    b'{"task": "e2e", "input": "x", "stop": [""]}', b'{"task": "e2e", "input": "x", "stop": ' + json.dumps(["a"] * 200_000).encode() + b"}",
    b'{"input": "x", "compose": {"average": [{"task": "e2e", "weight": 1e308}, {"task": "e2e-b", "weight": 1e308}]}}',
    b'{"input": "x", "compose": {"stack": ' + json.dumps(["e2e"] * 100_000).encode() + b"}}",
    b'{"input": "x", "compose": {"stack": [["e2e"], {"task": "e2e-b"}]}}', b'{"input": "x", "compose": []}',
    b'{"task": "e2e", "input": "x", "compose": {"stack": ["e2e-b", "e2e-b"]}}',
    b'{"task": "e2e"', b"\xff\xfe\x00", b"[]", b"null", b'{"task": "e2e", "input": "' + b"word " * 3000 + b'"}',
]


def test_malformed_inputs_get_4xx_json(client, tally):
    for body in MALFORMED:
        response = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        tally.count(response.status_code)
        assert 400 <= response.status_code < 500 and "detail" in response.json(), (body[:80], response.text[:200])
    for header in ("Bearer \xe9", "bearer secret", "Basic c2VjcmV0"):
        response = client.post("/v1/admin/reload", headers={"Authorization": header.encode("latin-1")})
        tally.count(response.status_code)
        assert response.status_code in (200, 401) and response.json()
    tally.row(f"malformed inputs ({len(MALFORMED)} bodies, 3 auth headers)", "all 4xx with a JSON body",
              "no 5xx")


def test_dropped_streams_are_cancelled_and_counted(server, client, tally):
    def cancelled() -> float:
        text = client.get("/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("hub_finished_total") and 'reason="cancelled"' in line)

    before = cancelled()
    for _ in range(10):
        with httpx.Client(base_url=server.url, timeout=30.0, trust_env=False) as dropper:
            with dropper.stream("POST", "/v1/generate", json={**NORMAL, "max_new_tokens": 100, "stream": True}) as r:
                next(r.iter_lines())
        tally.count(200)
    deadline = time.monotonic() + 10
    while cancelled() < before + 10 and time.monotonic() < deadline:
        time.sleep(0.2)
    tally.row("10 streams dropped after their first event", f"{cancelled() - before:.0f} counted cancelled",
              "all in hub_finished_total")
    assert cancelled() >= before + 10
    assert client.post("/v1/generate", json=NORMAL).status_code == 200


def test_overload_ten_times_the_queue_gets_only_200_or_429(trained_run, tiny_base, tmp_path, tally):
    publish(trained_run, tmp_path / "store", "e2e")
    server = start(tmp_path, tmp_path / "store", tiny_base, "--max-queue", "8", "--max-batch", "4")
    try:
        with httpx.Client(base_url=server.url, timeout=120.0, trust_env=False,
                          limits=httpx.Limits(max_connections=80)) as client:
            def one(i):
                try:
                    return client.post("/v1/generate", json={**NORMAL, "max_new_tokens": 16}).status_code
                except httpx.HTTPError:
                    return None

            with ThreadPoolExecutor(80) as pool:
                statuses = list(pool.map(one, range(80)))
    finally:
        server.stop()
    for status in statuses:
        tally.count(status)
    tally.row("80 concurrent requests on a queue of 8", f"{statuses.count(200)} × 200, {statuses.count(429)} × 429",
              "only 200/429, none lost")
    assert set(statuses) <= {200, 429}


def test_sigterm_mid_stream_finishes_the_stream_then_exits_0(trained_run, tiny_base, tmp_path, tally):
    publish(trained_run, tmp_path / "store", "e2e")
    server = start(tmp_path, tmp_path / "store", tiny_base)
    events: list[str] = []
    with httpx.Client(base_url=server.url, timeout=60.0, trust_env=False) as client:
        with client.stream("POST", "/v1/generate", json={**NORMAL, "max_new_tokens": 60, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(30)
    tally.count(200)
    final = json.loads(events[-1])
    tally.row("SIGTERM during a stream", f"stream ended with {final.get('finish_reason', final)}; exit {code}",
              "the stream completes, exit 0")
    assert "finish_reason" in final and code == 0
