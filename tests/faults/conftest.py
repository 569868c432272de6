"""The process-level fault suite (`make faults`, env HUB_FAULTS=1): real `hub serve` processes on loopback, each
fault tried as an attacker or an unlucky operator would. Every test adds its figures to one `Tally`; at the end
the table is printed and written to docs/RELIABILITY.md."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bench.common import percentile
from tests.conftest import FULL_FAULTS
from tests.test_server import publish, start_server

REPORT = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"


def p99(values: list[float]) -> float:
    return percentile(values, 99)


# The latency bound's percentile: p99 in the full suite; the fast setting's 40 samples have their maximum as p99, so
# one scheduling hiccup of a shared 2-core machine would decide it, and it compares p95 instead.
TAIL = 99 if FULL_FAULTS else 95


def tail(values: list[float]) -> float:
    return percentile(values, TAIL)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Tally:
    """Figures of the whole suite: every HTTP answer by class, and the named measurements of each scenario."""

    sent: int = 0
    server_errors: int = 0
    too_many: int = 0
    lost: int = 0
    other: dict[int, int] = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # scenario, figure, target / outcome
    started: float = field(default_factory=time.monotonic)

    def count(self, status: int | None) -> None:
        """One request's outcome; None means no answer at all (lost)."""
        self.sent += 1
        if status is None:
            self.lost += 1
        elif status >= 500:
            self.server_errors += 1
        elif status == 429:
            self.too_many += 1
        else:
            self.other[status] = self.other.get(status, 0) + 1

    def row(self, scenario: str, figure: str, target: str) -> None:
        self.rows.append((scenario, figure, target))

    def markdown(self) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.other.items()))
        lines = [
            "# Reliability: the fault suite",
            "",
            "Written by `make faults` (`tests/faults/`; the fast part of the suite, `tests/test_faults.py`, runs in "
            "`make test`). Every request goes to real `hub serve` processes on 127.0.0.1 with the tiny random "
            "GPT-2 of the tests; latencies are of that model on this machine, "
            f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs while it ran.",
            "",
            "| requests sent | 5xx (target 0) | 429 | lost (target 0) | other statuses | suite time |",
            "|---|---|---|---|---|---|",
            f"| {self.sent} | {self.server_errors} | {self.too_many} | {self.lost} | {statuses} | "
            f"{time.monotonic() - self.started:.0f} s |",
            "",
            "| scenario | measured | target / outcome |",
            "|---|---|---|",
            *[f"| {scenario} | {figure} | {target} |" for scenario, figure, target in self.rows],
            "",
        ]
        return "\n".join(lines)


_tally = Tally()


@pytest.fixture(scope="session")
def tally() -> Tally:
    return _tally


def pytest_terminal_summary(terminalreporter):
    if not FULL_FAULTS or (not _tally.sent and not _tally.rows):  # the fast setting of `make test` reports nothing
        return
    text = _tally.markdown()
    REPORT.write_text(text)
    terminalreporter.write_line("")
    terminalreporter.write_line(text)
    terminalreporter.write_line(f"written to {REPORT}")


@pytest.fixture(scope="session")
def fault_store(trained_run, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("fault-store") / "store"
    for name in ("e2e", "e2e-b"):
        publish(trained_run, store, name)
    return store


@pytest.fixture(scope="session")
def server(fault_store, tiny_base, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("fault-serve"), fault_store, tiny_base, "--watch-interval", "0.2",
                   "--max-queue", "64", admin_token="secret")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60.0, trust_env=False) as client:
        yield client
