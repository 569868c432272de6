"""The store on fsspec URLs: memory:// and a real S3-compatible server (moto on 127.0.0.1, through s3fs).

Publishing without rename (claim, files, hub.json last), readers ignoring uncommitted versions, one winner among
publishers of a version, the sha256-verified local cache, a server restart mid-publish, and the CLI on s3://.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from hub.errors import HubError, IntegrityError, NotFoundError
from hub.store.backends import open_store
from hub.store.backends.fsspec_store import CLAIM, FsspecStore
from hub.store.layout import TASK_TOKENS
from hub.store.local import AdapterStore
from tests.s3_server import s3_with_bucket


@pytest.fixture(scope="module")
def s3():
    yield from s3_with_bucket("adapters")


@pytest.fixture(params=["memory", "s3"])
def store(request, tmp_path) -> FsspecStore:
    prefix = uuid.uuid4().hex[:8]
    if request.param == "memory":
        return open_store(f"memory://hub-{prefix}", cache_dir=tmp_path / "cache")
    server = request.getfixturevalue("s3")
    return open_store(f"s3://adapters/{prefix}", cache_dir=tmp_path / "cache", **server.storage_options)


@pytest.fixture
def export(trained_run):
    return trained_run / "best"


def test_publish_list_show_load_like_the_local_store(store, export, tmp_path):
    first = store.publish(export, name="e2e")
    second = store.publish(export, name="e2e")
    assert (first.version, second.version) == ("1", "2")
    [summary] = store.list()
    assert summary.name == "e2e" and [v.version for v in summary.versions] == ["1", "2"]
    assert store.show("e2e").version == "2" and store.show("e2e@1").version == "1"
    loaded = store.load("e2e@1")
    local = AdapterStore(tmp_path / "local")
    local.publish(export, name="e2e")
    expected = local.load("e2e@1")
    assert loaded.adapter_tensors.keys() == expected.adapter_tensors.keys()
    assert all(torch.equal(loaded.adapter_tensors[k], v) for k, v in expected.adapter_tensors.items())
    assert torch.equal(loaded.token_rows, expected.token_rows)
    assert store.training_log("e2e@1")[1] == local.training_log("e2e@1")[1]
    assert store.remove("e2e@2") == ["e2e@2"]
    assert [v.version for v in store.list()[0].versions] == ["1"]
    with pytest.raises(NotFoundError, match="available: e2e"):
        store.show("nope")


def test_a_version_without_its_commit_marker_is_invisible_and_gc_removes_it(store, export):
    store.publish(export, name="e2e")
    store.fs.pipe_file(store._path("e2e", "2", CLAIM), b'{"at": 0}')
    store.fs.pipe_file(store._path("e2e", "2", TASK_TOKENS), b"half a publish")
    assert [v.version for v in store.list()[0].versions] == ["1"]
    assert store.publish(export, name="e2e").version == "3", "the abandoned number is not reused"
    assert [path.rsplit("/", 1)[-1] for path in store.gc(older_than_s=60)] == ["2"]
    assert not store.fs.exists(store._path("e2e", "2", CLAIM))


def test_two_publishers_of_one_version_one_wins_the_other_gets_a_clear_error(store, export):
    outcomes: list[str] = []

    def publish():
        try:
            outcomes.append(store.publish(export, name="e2e", version="7").ref)
        except HubError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=publish) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winner, loser = sorted(outcomes, key=lambda outcome: outcome != "e2e@7")
    assert winner == "e2e@7" and "e2e@7 already exists or is being published" in loser
    assert [v.ref for v in store.list()[0].versions] == ["e2e@7"]


def test_the_local_cache_is_verified_by_sha256(store, export):
    store.publish(export, name="e2e")
    store.load("e2e")
    sha = store.show("e2e").meta.files[TASK_TOKENS]
    cached = store.cache.folder / sha
    cached.write_bytes(b"tampered")
    assert torch.equal(store.load("e2e").token_rows, store.load("e2e").token_rows)
    assert cached.read_bytes() != b"tampered", "a bad cached copy is replaced by a verified download"
    cached.unlink()
    store.fs.pipe_file(store._path("e2e", "1", TASK_TOKENS), b"tampered in the bucket")
    with pytest.raises(IntegrityError, match="sha256"):
        store.load("e2e")


def test_a_server_restart_mid_publish_leaves_no_half_version(s3, export, tmp_path):
    store = open_store("s3://adapters/restart", cache_dir=tmp_path / "cache", **s3.storage_options)
    store.publish(export, name="e2e")
    upload = store.fs.put_file

    def upload_then_crash(*args, **kwargs):
        upload(*args, **kwargs)
        s3.stop()  # the server goes away after the first file

    store.fs.put_file = upload_then_crash
    with pytest.raises(HubError, match="was not committed"):
        store.publish(export, name="e2e")
    store.fs.put_file = upload
    s3.start()  # moto restarts empty: the bucket comes back, nothing half-published is listed
    s3.create_bucket("adapters")
    assert store.list() == []
    assert store.publish(export, name="e2e").version == "1"
    assert store.load("e2e").name == "e2e"


def test_the_cli_publishes_to_and_lists_from_s3(s3, trained_run, tmp_path):
    env = {**os.environ, **s3.environment, "HUB_CACHE": str(tmp_path / "cache")}

    def hub(*args):
        result = subprocess.run([sys.executable, "-m", "hub", *map(str, args)], capture_output=True, text=True,
                                env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "published e2e@1 to s3://adapters/cli/e2e/1" in hub("publish", trained_run, "--store", "s3://adapters/cli")
    listed = json.loads(hub("list", "--store", "s3://adapters/cli", "--json"))
    assert [row["name"] for row in listed] == ["e2e"]


def test_open_store_keeps_local_paths_local(tmp_path):
    assert isinstance(open_store(str(tmp_path / "store")), AdapterStore)
    assert isinstance(open_store(f"file://{tmp_path / 'other'}"), AdapterStore)
    assert isinstance(open_store("memory://somewhere"), FsspecStore)


def test_hub_serve_on_s3_serves_a_version_another_process_publishes_within_two_seconds(s3, trained_run, tiny_base,
                                                                                      tmp_path, monkeypatch):
    """An object store is polled (listing every --watch-interval, off the event loop): a name published by
    another process is served within 2 s. The watcher used to hand the s3 path to the file watcher and die."""
    from tests.test_server import gen, start_server

    for key, value in {**s3.environment, "HUB_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    url = f"s3://adapters/hot-{uuid.uuid4().hex[:8]}"

    def publish(name: str) -> None:
        result = subprocess.run([sys.executable, "-m", "hub", "publish", str(trained_run), "--store", url,
                                 "--name", name], capture_output=True, text=True, env=os.environ, timeout=120)
        assert result.returncode == 0, result.stderr

    publish("e2e")
    server = start_server(tmp_path, url, tiny_base, "--watch-interval", "0.5")
    try:
        with server.client() as client:
            publish("fresh")
            published = time.monotonic()
            while "fresh" not in [t["name"] for t in client.get("/v1/tasks").json()["tasks"]]:
                assert time.monotonic() - published < 2.0, "not served 2 s after another process published it"
                time.sleep(0.05)
            assert gen(client, "fresh", max_new_tokens=3).status_code == 200
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()
