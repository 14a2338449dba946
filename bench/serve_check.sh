#!/usr/bin/env bash
# The README's Prefect commands against a real server, with the pinned versions: start a server, serve the
# deployments, list them, trigger two runs at once (the second waits for its concurrency slot), watch them.
# Best on a workspace whose stages are up to date (after `make demo`, or bench/bench_run_cache.py's), so the
# runs finish fast. Usage, from the project root: bench/serve_check.sh [WORKSPACE] [PORT]
set -euo pipefail
WS=${1:-.}
PORT=${2:-4299}
BIN=$(pwd)/.venv/bin
export PREFECT_HOME=$(mktemp -d) PREFECT_API_URL=http://127.0.0.1:$PORT/api PREFECT_SERVER_ANALYTICS_ENABLED=false
LOG=${PREFECT_HOME}
cleanup() { kill ${SERVE_PID:-} ${SERVER_PID:-} 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
"$BIN/prefect" server start --port "$PORT" >"$LOG/server.log" 2>&1 & SERVER_PID=$!
for _ in $(seq 120); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 1; done
"$BIN/mdpipe" --root "$WS" serve >"$LOG/serve.log" 2>&1 & SERVE_PID=$!
for _ in $(seq 120); do "$BIN/prefect" deployment ls 2>/dev/null | grep -q mdpipe-retrain && break; sleep 2; done
echo "== prefect deployment ls"; "$BIN/prefect" deployment ls
echo "== two runs at once"
"$BIN/prefect" deployment run 'mdpipe-pipeline/mdpipe' >/dev/null
"$BIN/prefect" deployment run 'mdpipe-pipeline/mdpipe' --watch --watch-timeout 900 | tail -3
for _ in $(seq 300); do
  states=$("$BIN/prefect" flow-run ls --flow-name mdpipe-pipeline 2>/dev/null | grep -ci completed || true)
  [ "$states" -ge 2 ] && break; sleep 2
done
echo "== prefect flow-run ls"; "$BIN/prefect" flow-run ls --flow-name mdpipe-pipeline
grep -i "concurrency\|busy\|waiting" "$LOG/serve.log" | head -5 || true
echo "logs: $LOG"
