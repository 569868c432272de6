"""Store faults: publishes killed with SIGKILL, and every bad file of issue 11 under a live server."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hub.store.local import AdapterStore
from tests.conftest import FULL_FAULTS
from tests.test_server import HUB, REPO, flip_last_byte, publish, start_server as start

KILLS, PARALLEL = (30 if FULL_FAULTS else 9), 3


def hub_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*HUB, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert not check or result.returncode == 0, result.stderr
    return result


# A publisher whose file copies pause, so that SIGKILL lands inside the publish (staging, copying, renaming).
SLOW_PUBLISH = """
import shutil, sys, time
from hub.store.local import AdapterStore
copy = shutil.copyfile
def slow_copy(src, dst, *args, **kwargs):
    print("staging", flush=True)
    result = copy(src, dst, *args, **kwargs)
    time.sleep(0.1)
    return result
shutil.copyfile = slow_copy
AdapterStore(sys.argv[1]).publish(sys.argv[2], name="k")
"""


def test_kill_9_during_publish_never_leaves_a_partial_version(trained_run, tmp_path, tally):
    store = tmp_path / "store"
    rng = random.Random(0)
    for _ in range(KILLS // PARALLEL):  # concurrent publishers into one store, each killed inside its publish
        processes = [subprocess.Popen([sys.executable, "-c", SLOW_PUBLISH, str(store), str(trained_run / "best")],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
                     for _ in range(PARALLEL)]
        for process in processes:
            assert process.stdout.readline() == "staging\n"  # the publish has begun: kill it somewhere inside
            time.sleep(rng.uniform(0.0, 0.3))  # its three copies take 0.3 s, then it commits
            process.kill()
        for process in processes:
            process.wait(30)
    listing = AdapterStore(store).list()
    skipped = [k for s in listing for k in s.skipped]
    leftovers = [p.name for p in store.glob(".tmp-*")]
    gc = hub_cli("store", "gc", "--store", store, "--older-than", "0")
    after = [p.name for p in store.glob(".tmp-*")]
    versions = [v.version for s in listing for v in s.versions]
    tally.row(f"kill -9 inside `publish` × {KILLS}",
              f"{len(versions)} killed after their commit (complete), {len(skipped)} partial versions; "
              f"{len(leftovers)} staging folders left → {len(after)} after `hub store gc`",
              "no partial version visible, staging cleaned")
    assert skipped == [] and after == [] and gc.returncode == 0, (skipped, after)
    assert all(AdapterStore(store).load(f"k@{v}") for v in versions)


def break_store(store: Path) -> None:
    """Every store fault of issue 11, next to good versions."""
    def edit(ref: str, change) -> None:
        name, version = ref.split("@")
        path = store / name / version / "hub.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    edit("e2e@2", lambda d: d.pop("backbone"))  # valid JSON, a key missing
    flip_last_byte(store / "c" / "2" / "adapter.safetensors")  # corrupt newest version
    (store / "f" / "1" / "hub.json").unlink()
    os.mkfifo(store / "f" / "1" / "hub.json")  # a FIFO named hub.json
    os.symlink(store / "e2e", store / "linked")  # a symlinked name
    stale = store / ".tmp-killed"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))


def test_store_faults_stay_local(trained_run, tiny_base, tmp_path, tally):
    store = tmp_path / "store"
    for name, count in (("e2e", 2), ("c", 2), ("f", 1)):
        for _ in range(count):
            publish(trained_run, store, name)
    publish(trained_run, store, "good")
    break_store(store)
    server = start(tmp_path, store, tiny_base, "--watch-interval", "0.2", admin_token="secret")
    try:
        with httpx.Client(base_url=server.url, timeout=30.0, trust_env=False) as client:
            tasks = client.get("/v1/tasks").json()
            served = {t["name"]: t["version"] for t in tasks["tasks"]}
            skipped = {s["ref"]: s["reason"] for s in tasks["skipped"]}
            reload = client.post("/v1/admin/reload", headers={"Authorization": "Bearer secret"})
            health = [client.get("/healthz").status_code for _ in range(5)]
            generated = client.post("/v1/generate", json={"task": "c", "input": "name[The Eagle]"}).status_code
            for status in (reload.status_code, *health, generated):
                tally.count(status)
    finally:
        server.stop()
    rm = hub_cli("rm", "linked", "--store", store, check=False)
    show = hub_cli("show", "e2e@2", "--store", store, check=False)
    tally.row("store faults (missing key, corrupt newest, FIFO hub.json, symlinked name, stale staging)",
              f"served {served}; skipped {sorted(skipped)}", "newest good version serves, others skipped with why")
    assert served == {"e2e": "1", "c": "1", "good": "1"}
    assert set(skipped) == {"e2e@2", "c@2", "f@1", "linked"}
    assert reload.status_code == 200 and health == [200] * 5 and generated == 200
    assert not (store / ".tmp-killed").exists(), "stale staging is removed on start"
    for result in (rm, show):
        assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
