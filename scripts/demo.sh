#!/usr/bin/env bash
# Train a short E2E adapter on the stand-in GPT-2, publish it, serve it, ask one question, stop the server.
# `demo.sh serve` only serves the demo's store (what `make demo-serve` runs), until Ctrl-C.
set -euo pipefail
SHARED=${SHARED:-../shared}
STEPS=${DEMO_STEPS:-300}
PORT=${DEMO_PORT:-8765}
DEMO=.demo
BASE="$SHARED/models/gpt2-standin"
MR="name[The Eagle], eatType[coffee shop], food[French], area[riverside], familyFriendly[yes]"

# torch starts one thread per logical CPU; on a shared or hyper-threaded machine that oversubscribes the cores.
physical_cores() { lscpu -p=CORE,SOCKET 2>/dev/null | grep -v '^#' | sort -u | wc -l; }
THREADS=${HUB_THREADS:-$(physical_cores)}
[ "${THREADS:-0}" -gt 0 ] || THREADS=$(nproc)
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

serve() {
    echo "== serving $DEMO/store on http://127.0.0.1:$PORT/ ($THREADS torch threads)"
    exec hub serve --store "$DEMO/store" --device cpu --host 127.0.0.1 --port "$PORT"
}
[ "${1:-}" = serve ] && serve

[ -d "$BASE" ] || { echo "error: $BASE not found; set SHARED=path/to/shared" >&2; exit 1; }
rm -rf "$DEMO"
echo "== training an e2e adapter for $STEPS steps on $BASE ($THREADS torch threads)"
hub train e2e --base "$BASE" --data "$SHARED/data/e2e/original" --max-steps "$STEPS" --eval-every 100 \
    --device cpu --out "$DEMO/run"
hub publish "$DEMO/run" --store "$DEMO/store"
hub list --store "$DEMO/store"

echo "== starting the server on 127.0.0.1:$PORT"
hub serve --store "$DEMO/store" --device cpu --host 127.0.0.1 --port "$PORT" > "$DEMO/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null && break
    kill -0 $SERVER 2>/dev/null || { cat "$DEMO/server.log"; exit 1; }
    sleep 0.5
done

echo "== POST /v1/generate  task=e2e  input=$MR"
curl -sf "http://127.0.0.1:$PORT/v1/generate" -H 'content-type: application/json' \
    -d "{\"task\": \"e2e\", \"input\": \"$MR\"}" | python3 -m json.tool
cat <<NOTE

Why the answer may name another restaurant: the stand-in GPT-2 in $BASE cannot copy words from its prompt
(its README measures this) and the adapter leaves attention frozen, so the E2E adapter writes E2E-style
sentences with restaurant names from its training data. This is the backbone, not a bug. A real GPT-2
(--base gpt2, online) copies well: published E2E results put this adapter close to full fine-tuning there
(docs/tasks/e2e.md, "How long to train E2E on the stand-in"; no real-GPT-2 output was measured offline here).

Next steps (the server above has stopped):
  make demo-serve                       # serve the demo store; the playground is http://127.0.0.1:$PORT/
  source .venv/bin/activate             # puts \`hub\` on PATH
  export HUB_STORE=$DEMO/store          # the demo published here, not into adapters_store/
  hub show e2e --plot                   # metadata, and the training curve as a PNG
NOTE
