#!/usr/bin/env bash
# The Prefect UI's run form of the pipeline deployment, as a user opens it, in a headless browser: start a
# server, register the deployments (`mdpipe deploy`, no worker needed), load the deployment's custom-run page
# and save a screenshot (bench/results/run_form.png) and the rendered page text (run_form.txt).
# Needs a headless Chromium (Debian: apt-get install chromium-headless-shell).
# Usage, from the project root: bench/run_form_screenshot.sh [WORKSPACE] [PORT]
set -euo pipefail
WS=${1:-.}
PORT=${2:-4303}
BIN=$(pwd)/.venv/bin
OUT=$(pwd)/bench/results
CHROME=$(command -v chromium-headless-shell || command -v chromium || true)
[ -n "$CHROME" ] || { echo "no headless Chromium found" >&2; exit 2; }
export PREFECT_HOME=$(mktemp -d) PREFECT_API_URL=http://127.0.0.1:$PORT/api PREFECT_SERVER_ANALYTICS_ENABLED=false
cleanup() { kill ${SERVER_PID:-} 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
"$BIN/prefect" server start --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 & SERVER_PID=$!
for _ in $(seq 120); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 1; done
"$BIN/mdpipe" --root "$WS" deploy --pool form-check >/dev/null
ID=$("$BIN/python" -c "
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c: print(c.read_deployment_by_name('mdpipe-pipeline/mdpipe').id)")
URL="http://127.0.0.1:$PORT/deployments/deployment/$ID/run"
mkdir -p "$OUT"
FLAGS=(--no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,2400 --virtual-time-budget=20000)
"$CHROME" "${FLAGS[@]}" --screenshot="$OUT/run_form.png" "$URL" 2>/dev/null
"$CHROME" "${FLAGS[@]}" --dump-dom "$URL" 2>/dev/null | "$BIN/python" -c "
import html, re, sys
text = re.sub(r'<(script|style)[^>]*>.*?</\1>', ' ', sys.stdin.read(), flags=re.S)
print(re.sub(r'\s+', ' ', html.unescape(re.sub(r'<[^>]+>', ' ', text))))" > "$OUT/run_form.txt"
echo "form: $URL"
echo "screenshot: $OUT/run_form.png; text: $OUT/run_form.txt"
for word in quick data_root holdout_domains epochs num_workers; do
  grep -qi "$word" "$OUT/run_form.txt" && echo "shown without a click: $word" || echo "NOT shown: $word"
done
