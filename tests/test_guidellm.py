"""GuideLLM 0.8.1, unchanged, against `hub serve` for a few seconds: chat completions (its default request format:
content as a list of text parts, `stream_options` with usage) with backend validation on, zero errored requests.

Needs GuideLLM in its own virtual environment (`make bench-guidellm` installs it in .venv-guidellm; or set
GUIDELLM to the binary); skipped, saying so, without it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.decode_bench import publish_random
from bench.guidellm_bench import guidellm_command, summary
from bench.trace_bench import start_server, stop_server
from hub.store.local import AdapterStore

GUIDELLM = Path(os.environ.get("GUIDELLM", Path(__file__).resolve().parents[1] / ".venv-guidellm/bin/guidellm"))
pytestmark = pytest.mark.skipif(not GUIDELLM.is_file(), reason=f"GuideLLM is not installed at {GUIDELLM} "
                                                                "(`make bench-guidellm` installs it, or set GUIDELLM)")


@pytest.mark.parametrize("request_format", [None, "/v1/completions"])
def test_guidellm_runs_unchanged_with_no_errored_request(tiny_base, tmp_path, request_format):
    store = AdapterStore(tmp_path / "store")
    publish_random(store, tiny_base, [("a0", 10)], seed=7)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server, url = start_server(str(store.root), tiny_base, [], tmp_path / "serve.log", env)
    report = tmp_path / "report.json"
    try:
        command = guidellm_command(str(GUIDELLM), url, "a0", tiny_base, rate=2, seconds=4, prompt_tokens=16,
                                   output_tokens=8, report=report, request_format=request_format)
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop_server(server)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = summary(json.loads(report.read_text()))
    assert result["errored"] == 0 and result["successful"] > 0, (result, (tmp_path / "serve.log").read_text()[-3000:])
