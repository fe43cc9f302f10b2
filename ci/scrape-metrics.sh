#!/usr/bin/env bash
# Runs the simulator and a real daemon on a scratch SQLite outbox, syncs a few hundred changes
# (some of which fail for good), and saves a /metrics scrape for `promtool check metrics` and the
# dashboard's metric-name check.   ci/scrape-metrics.sh PATH_TO_PRISM_SYNC_BINARY OUT_FILE
set -euo pipefail
BIN=$1
OUT=$2
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
sim_port=$(free_port)
metrics_port=$(free_port)
team=00000000-0000-4000-8000-0000000000bb
refused=99999999-0000-4000-8000-000000000001
"$BIN" simulate --listen "127.0.0.1:$sim_port" --api-key k --team "$team" --error-503-rate 0.05 \
  --item-error-rate 0.02 >"$dir/sim.log" 2>&1 &
sim=$!
export DATABASE_URL="sqlite://$dir/outbox.db?mode=rwc" MICRO_API_KEY=k MICRO_TEAM_ID=$team \
  MICRO_BASE_URL="http://127.0.0.1:$sim_port" PRISM_SYNC__TELEMETRY__LISTEN="127.0.0.1:$metrics_port" \
  PRISM_SYNC__TELEMETRY__SAMPLE_INTERVAL=200ms PRISM_SYNC__RETRY__BASE_DELAY=20ms PRISM_SYNC__RETRY__MAX_DELAY=200ms
"$BIN" migrate >/dev/null
python3 - "$refused" >"$dir/changes.jsonl" <<'PY'
import json, sys, uuid
for i in range(300):
    print(json.dumps({"record_id": str(uuid.uuid4()), "patch": {"default": {"n": i}}}))
print(json.dumps({"record_id": sys.argv[1], "patch": {"list": {"tags": ["x"]}}}))
PY
"$BIN" enqueue "$dir/changes.jsonl" >/dev/null
"$BIN" run >"$dir/daemon.log" 2>&1 &
daemon=$!
trap 'kill $daemon $sim 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if curl -fs "http://127.0.0.1:$metrics_port/metrics" >"$OUT" 2>/dev/null \
     && grep -q '^prism_sync_rows{state="pending"} 0' "$OUT" \
     && grep -q '^prism_sync_items_total{outcome="succeeded"}' "$OUT"; then
    break
  fi
  sleep 0.2
done
kill -TERM $daemon
wait $daemon
grep -c '^prism_sync_' "$OUT" | sed 's/^/scraped prism_sync_ series: /'
