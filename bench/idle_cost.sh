#!/usr/bin/env bash
# What an idle daemon costs the database: server CPU while `prism-sync run` has nothing to send,
# against an outbox holding N finished rows (0.1 % of them dead), for each build given, round by
# round, with a round of no daemon at all first (the server's own idle).
#   (a) the gauge sampler (`telemetry.sample_interval`, 5 s) counts rows by state;
#   (b) the claim loop polls (`poll.interval`, and on Postgres `poll.idle_interval`).
# Like WAL, server CPU is one figure per server: keep everything else off it while this runs
# (a test suite on the same server shows up in the figures).
#
# usage: bench/idle_cost.sh [--rows 1000000] [--seconds 60] [--rounds 2] LABEL=BINARY...
#   e.g. bench/idle_cost.sh before=/tmp/before/prism-sync after=target/release/prism-sync
#   Postgres: PRISM_SYNC_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres);
#   its data directory (for bench/pg_cpu.sh, read through /proc: run as root or as the server's
#   user): PGDATA, default the one `SHOW data_directory` names.
set -euo pipefail
cd "$(dirname "$0")/.."

rows=1000000 seconds=60 rounds=2 builds=()
while [ $# -gt 0 ]; do
  case $1 in
    --rows) rows=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *=*) builds+=("$1"); shift ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#builds[@]} -gt 0 ] || { echo "name at least one LABEL=BINARY (see --help)" >&2; exit 2; }
for b in "${builds[@]}"; do
  [ -x "${b#*=}" ] || { echo "${b#*=} is not an executable" >&2; exit 2; }
done
admin=${PRISM_SYNC_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pgdata=${PGDATA:-$(psql -qAtX "$admin" -c 'SHOW data_directory')}
db=prism_idle_cost
url=${admin%/*}/$db
first=${builds[0]#*=}

psql -qX "$admin" -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
DATABASE_URL=$url "$first" migrate >/dev/null
psql -qX "$url" >/dev/null <<SQL
INSERT INTO prism_outbox (record_id, patch, state, completed_at, attempts, last_error_code)
SELECT gen_random_uuid(), '{"default":{"email":"someone@example.com","name":"Someone Example"}}'::jsonb,
       CASE WHEN g % 1000 = 0 THEN 'dead' ELSE 'succeeded' END, now(), 1,
       CASE WHEN g % 1000 = 0 THEN 'not_found' END
FROM generate_series(1, $rows) g;
VACUUM ANALYZE prism_outbox;
SQL

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$first" simulate --listen "127.0.0.1:$port" >/dev/null 2>&1 &
sim=$!
logs=$(mktemp -d)
trap 'kill $sim 2>/dev/null || true; psql -qX "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null' EXIT
sleep 1

# One measurement: settle for 10 s, then the server's CPU over `seconds`.
measure() {
  local label=$1 bin=$2 pid=""
  if [ -n "$bin" ]; then
    DATABASE_URL=$url MICRO_API_KEY=sim-key MICRO_TEAM_ID=00000000-0000-4000-8000-000000000001 \
      MICRO_BASE_URL=http://127.0.0.1:$port PRISM_SYNC__TELEMETRY__LISTEN=127.0.0.1:0 \
      "$bin" run --no-migrate >"$logs/${label//\//-}.log" 2>&1 &
    pid=$!
  fi
  sleep 10
  local c0 c1
  c0=$(bench/pg_cpu.sh "$pgdata"); sleep "$seconds"; c1=$(bench/pg_cpu.sh "$pgdata")
  if [ -n "$pid" ]; then kill -TERM "$pid"; wait "$pid" || true; fi
  awk -v l="$label" -v d=$((c1 - c0)) -v t="$seconds" \
    'BEGIN { printf "%-12s server CPU %6d ms in %ss = %5.2f %% of a core\n", l, d, t, d / t / 10 }'
}

echo "outbox: $rows finished rows; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$rounds"); do
  measure "none/$r" ""
  for b in "${builds[@]}"; do measure "${b%%=*}/$r" "${b#*=}"; done
done
