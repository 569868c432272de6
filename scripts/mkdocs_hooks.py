"""MkDocs hook (mkdocs.yml `hooks:`): the HTTP API reference, generated at build time from the FastAPI app.

`on_files` adds two generated files to the site, so nothing is written into docs/:
- `reference/openapi.json`: the OpenAPI document `hub serve` publishes at /openapi.json (scripts/openapi_schema.py);
- `reference/http-api.md`: every route of that document as markdown (summary, request fields with their types,
  defaults and bounds, responses), followed by the interactive Swagger UI of the same document
  (mkdocs-swagger-ui-tag).
A route added to the server therefore appears on the site at the next `make docs`, with no page to edit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).resolve().parent))

from openapi_schema import schema  # noqa: E402

METHOD_ORDER = ("get", "post", "put", "delete", "patch")
BOUNDS = (("minimum", "≥ {}"), ("exclusiveMinimum", "> {}"), ("maximum", "≤ {}"), ("exclusiveMaximum", "< {}"),
          ("minLength", "≥ {} characters"), ("maxLength", "≤ {} characters"), ("minItems", "≥ {} items"),
          ("maxItems", "≤ {} items"), ("const", "= {}"))
SECTIONS = (("Generation", ("/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/models")),
            ("Sentence VAE", ("/v1/vae/",)),
            ("Tasks and playground", ("/v1/tasks",)),
            ("Health and metrics", ("/health", "/healthz", "/readyz", "/metrics")),
            ("Admin", ("/v1/admin/",)))


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and abs(value) >= 2 ** 53:
        return "2^63-1" if value >= 2 ** 62 else str(value)
    return json.dumps(value)


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(spec: dict) -> str:
    """A field's type in one line: `string`, `integer ≥ 1`, `string | object`, `array of ChatMessage`."""
    if "$ref" in spec:
        return f"[{_ref_name(spec['$ref'])}](#{_ref_name(spec['$ref']).lower()})"
    if "anyOf" in spec or "oneOf" in spec:
        parts = [_type(part) for part in spec.get("anyOf", spec.get("oneOf"))]
        return " \\| ".join(dict.fromkeys(parts))
    if not spec:
        return "JSON"
    kind = spec.get("type", "any")
    if isinstance(kind, list):
        kind = " \\| ".join(kind)
    bounds = [fmt.format(_number(spec[key])) for key, fmt in BOUNDS if key in spec]
    if "enum" in spec:
        bounds.append("one of " + ", ".join(f"`{v}`" for v in spec["enum"]))
    kind += f" ({', '.join(bounds)})" if bounds else ""
    if spec.get("type") == "array":
        kind += f" of {_type(spec.get('items', {}))}"
    return kind


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fields(model: dict) -> list[str]:
    required = set(model.get("required", ()))
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, spec in model.get("properties", {}).items():
        default = "required" if name in required else (f"`{json.dumps(spec['default'])}`" if "default" in spec else "")
        rows.append(f"| `{name}` | {_type(spec)} | {default} | {_cell(spec.get('description', ''))} |")
    return rows if len(rows) > 2 else ["(no fields)"]


def _body_schema(content: dict) -> tuple[str, dict] | None:
    for media, entry in content.items():
        if "schema" in entry:
            return media, entry["schema"]
    return None


def _operation(path: str, method: str, op: dict, components: dict) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", ""]
    if op.get("description"):
        lines += [op["description"].strip(), ""]
    elif op.get("summary"):
        lines += [op["summary"] + ".", ""]
    params = [p for p in op.get("parameters", ())]
    if params:
        lines += ["| parameter | in | type |", "|---|---|---|"]
        lines += [f"| `{p['name']}` | {p['in']} | {_type(p.get('schema', {}))} |" for p in params] + [""]
    body = op.get("requestBody")
    if body:
        media, spec = _body_schema(body.get("content", {})) or ("", {})
        lines += [f"Request body ({media}): {_type(spec)}.", ""]
        if "$ref" in spec:  # the body's fields here, so a route reads on its own
            lines += _fields(components.get(_ref_name(spec["$ref"]), {})) + [""]
    lines += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in sorted(op.get("responses", {}).items()):
        found = _body_schema(response.get("content", {}))
        shape = f"{_type(found[1])} ({found[0]})" if found else ""
        lines.append(f"| {status} | {_cell(response.get('description', ''))} | {shape} |")
    return lines + [""]


def render(document: dict) -> str:
    info = document["info"]
    lines = [
        "# HTTP API reference",
        "",
        "Generated when the site is built, from the OpenAPI document of the FastAPI app that `hub serve` runs "
        f"(OpenAPI {document['openapi']}, \"{info['title']}\" {info['version']}; "
        "[openapi.json](openapi.json), the same document a running server returns at `GET /openapi.json`). "
        "The [serving guide](../guide/serving.md) explains how the routes behave together: errors, streaming, "
        "hot publishing, limits.",
        "",
    ]
    if info.get("description"):
        lines += [f"!!! note\n    {info['description']}", ""]
    paths = document["paths"]
    components = document.get("components", {}).get("schemas", {})
    placed: set[str] = set()
    for title, prefixes in SECTIONS + (("Other", ("/",)),):
        chosen = [p for p in paths if p not in placed and any(p == x or (x.endswith("/") and p.startswith(x))
                                                               for x in prefixes)]
        if not chosen:
            continue
        lines += [f"## {title}", ""]
        for path in chosen:
            placed.add(path)
            for method in sorted(paths[path], key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 9):
                lines += _operation(path, method, paths[path][method], components)
    lines += ["## Schemas", ""]
    for name, model in sorted(document.get("components", {}).get("schemas", {}).items()):
        lines += [f"### {name}", ""]
        if model.get("description"):
            lines += [_cell(model["description"].strip()), ""]
        lines += _fields(model) + [""]
    lines += ["## Try it (Swagger UI)", "", "The same document, interactive (send requests to a server you run with "
              "`hub serve`; its own copy is at `/docs`).", "", '<swagger-ui src="openapi.json"/>', ""]
    return "\n".join(lines)


def on_files(files, config):
    document = schema()
    files.append(File.generated(config, "reference/openapi.json", content=json.dumps(document, indent=1)))
    files.append(File.generated(config, "reference/http-api.md", content=render(document)))
    return files
