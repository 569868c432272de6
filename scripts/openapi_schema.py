"""Write the HTTP API's OpenAPI document as `hub serve` publishes it at /openapi.json, without loading a model.

The routes are built over a backend that is never started (`server.app.build_app` reads only `vae`, `store` and
`on_finished` of it while building), so the document is exactly the served one: the same route functions, request
and response models and error responses. The docs site's hook (docs/hooks/openapi.py) calls `schema()` at build
time; run it by hand to get the file:

    python scripts/openapi_schema.py > openapi.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def schema() -> dict:
    from server.app import build_app

    # vae set: the VAE routes are documented; no tiers to export
    backend = SimpleNamespace(vae=object(), store=None, on_finished=None, adapter_tiers=lambda: None)
    return build_app(backend).openapi()  # type: ignore[arg-type]


if __name__ == "__main__":
    json.dump(schema(), sys.stdout, indent=1)
    sys.stdout.write("\n")
