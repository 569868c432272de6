#!/usr/bin/env bash
# The package as a user gets it: build the wheel and sdist (`python -m build` -> dist/), install the wheel into a
# fresh venv outside the source tree, and use the `hub` it installs: --version, train a few steps on the stand-in
# GPT-2, publish, serve, one request answered, the playground page and the metric scripts from the package data.
# `make wheel-check` runs it (CI too); PYTHON is the interpreter that has `build` (the project's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-.venv/bin/python}
SHARED=$(cd "${SHARED:-../shared}" && pwd)
PORT=${WHEEL_CHECK_PORT:-8799}
BASE="$SHARED/models/gpt2-standin"
[ -d "$BASE" ] || { echo "error: $BASE not found; set SHARED=path/to/shared" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
started=$SECONDS
step() { echo "== [$((SECONDS - started)) s] $*"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hub-wheel-check.XXXXXX")
SERVER=
cleanup() {
    [ -n "$SERVER" ] && { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
    rm -rf "$WORK"
}
trap cleanup EXIT

step "python -m build -> dist/ (wheel and sdist)"
rm -rf dist
"$PYTHON" -m build --outdir dist . > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
VERSION=$("$PYTHON" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])" 2>/dev/null \
          || sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL=$(ls dist/gpt2_adapter_hub-"$VERSION"-py3-none-any.whl)
ls -l dist

step "the wheel holds the package data (playground, metric scripts)"
"$PYTHON" - "$WHEEL" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
needed = ["server/static/index.html", "server/static/style.css", "server/static/js/main.js",
          "hub/evaluation/metrics/e2e/e2e.py", "hub/evaluation/metrics/sacrebleu/sacrebleu.py",
          "hub/evaluation/metrics/rouge/rouge.py", "hub/evaluation/metrics/coqa/coqa.py",
          "hub/evaluation/metrics/persona_f1/persona_f1.py", "cli/main.py", "tasks/e2e.py", "server/app.py"]
missing = [n for n in needed if n not in names]
assert not missing, f"missing from the wheel: {missing}"
assert not [n for n in names if n.startswith(("tests/", "bench/", "docs/"))], "tests, bench or docs in the wheel"
print(f"{len(names)} files, package data present")
PY

step "fresh venv, pip install $WHEEL"
python3 -m venv "$WORK/venv"
{ "$WORK/venv/bin/pip" install --quiet --upgrade pip && "$WORK/venv/bin/pip" install --quiet --no-compile "$ROOT/$WHEEL"; } \
    > "$WORK/pip.log" 2>&1 || { grep -v "Location .* is ignored" "$WORK/pip.log" | tail -40; exit 1; }
HUB="$WORK/venv/bin/hub"

cd "$WORK"  # outside the source tree: everything below imports the installed package
step "hub --version"
"$HUB" --version | tee version.txt
grep -q "hub $VERSION " version.txt
"$WORK/venv/bin/python" - <<'PY'
import hub, server
from hub.evaluation.metrics import available_metrics, load_metric
assert "site-packages" in hub.__file__ and "site-packages" in server.__file__, (hub.__file__, server.__file__)
names = available_metrics()
assert {"e2e", "sacrebleu", "rouge", "coqa", "persona_f1"} <= set(names), names
score = load_metric("sacrebleu").compute(predictions=["a cat sat on the mat"], references=[["a cat sat on the mat"]])
assert round(score["score"]) == 100, score
print("installed from the wheel:", hub.__file__, "| metrics:", ", ".join(names))
PY

step "hub train e2e (3 steps on the stand-in), hub publish"
"$HUB" train e2e --base "$BASE" --data "$SHARED/data/e2e/original" --max-steps 3 --batch-size 4 --grad-accum 1 \
    --device cpu --out run > train.log 2>&1 || { cat train.log; exit 1; }
tail -3 train.log
"$HUB" publish run --store store
"$HUB" list --store store

step "hub serve on 127.0.0.1:$PORT"
"$HUB" serve --store store --device cpu --host 127.0.0.1 --port "$PORT" > server.log 2>&1 &
SERVER=$!
for _ in $(seq 600); do  # up to 5 minutes: a loaded machine imports torch and the app slowly
    curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { cat server.log; exit 1; }
    sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/readyz"; echo

step "one request: POST /v1/generate"
curl -sf "http://127.0.0.1:$PORT/v1/generate" -H 'content-type: application/json' \
    -d '{"task": "e2e", "input": "name[The Eagle], food[French]", "max_new_tokens": 12}' | tee answer.json; echo
"$WORK/venv/bin/python" -c "
import json; a = json.load(open('answer.json'))
assert a['task'] == 'e2e' and a['finish_reason'] in ('stop', 'length') and a['usage']['completion_tokens'] > 0, a"
curl -sf "http://127.0.0.1:$PORT/" | grep -q "<html" || { echo "the playground page is missing" >&2; exit 1; }
echo "playground page served from the installed package"

step "wheel check passed: dist/ has the wheel and the sdist"
