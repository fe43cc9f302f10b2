#!/usr/bin/env bash
# Serves the simulator and runs ci/sdk_check.py (the official micro-so SDK, strict validation)
# against it.   ci/sdk-check.sh PATH_TO_PRISM_SYNC_BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$1
venv=${XDG_CACHE_HOME:-$HOME/.cache}/prism-sync-ci/sdk-venv
if ! "$venv/bin/python" -c 'import micro_so' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r ci/sdk-requirements.txt
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
key=sdk-check-key
team=00000000-0000-4000-8000-0000000000aa
log=$(mktemp)
"$BIN" simulate --listen "127.0.0.1:$port" --api-key "$key" --team "$team" >"$log" 2>&1 &
sim=$!
trap 'kill $sim 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  curl -fs "http://127.0.0.1:$port/_sim/stats" >/dev/null && break
  sleep 0.1
done
"$venv/bin/python" ci/sdk_check.py "http://127.0.0.1:$port" "$key" "$team"
