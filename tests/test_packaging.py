"""`hub --version`, and the docs site's HTTP API page: generated from the same app `hub serve` runs, every route in it.
(`make docs` builds the site strictly and `make wheel-check` installs the wheel; these are the fast parts.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app, hub_version

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_hub_version_prints_the_installed_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"hub {hub_version()} (gpt2-adapter-hub)"


def test_the_api_reference_page_lists_every_route_of_the_served_openapi_document():
    pytest.importorskip("mkdocs", reason="the docs extra (make venv installs it)")
    document = _script("openapi_schema").schema()
    assert {"/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/vae/{task}/encode", "/metrics"} <= set(
        document["paths"])
    page = _script("mkdocs_hooks").render(document)
    for path, methods in document["paths"].items():
        for method in methods:
            assert f"### `{method.upper()} {path}`" in page
    assert "| `task` | string | required | adapter name |" in page  # a request body's fields, inline
    assert '<swagger-ui src="openapi.json"/>' in page
