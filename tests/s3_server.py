"""An S3-compatible server for tests and benchmarks: moto's standalone server on 127.0.0.1, a subprocess that can
be stopped and started again on the same port (moto keeps its buckets in memory: a restart empties it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import s3fs

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict:
        """s3fs options: this endpoint, fake credentials, no retries (a stopped server fails fast)."""
        return {"endpoint_url": self.url, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "skip_instance_cache": True,
                "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}

    @property
    def environment(self) -> dict[str, str]:
        """Environment for a `hub` process to reach this server with `--store s3://...` (fsspec's config)."""
        return {**CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": self.url}

    def start(self, timeout_s: float = 30) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, **CREDENTIALS})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto did not start on port {self.port} in {timeout_s}s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def create_bucket(self, name: str) -> None:
        s3fs.S3FileSystem(**self.storage_options).mkdir(name)

    def __enter__(self) -> "S3Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def s3_with_bucket(bucket: str):
    """A pytest fixture body: a moto server with `bucket` created, for the fixture's scope."""
    with S3Server() as server:
        server.create_bucket(bucket)
        yield server
