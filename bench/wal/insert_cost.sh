#!/usr/bin/env bash
# The application's insert alone, as applications make it: TXNS transactions of ROWS_PER_TXN changes
# each (one INSERT statement), from one pgbench client with prepared statements, on a fresh database
# with a variant's schema (run_variant.sh's setup, so a variant's triggers fire). For variants that
# add work to the application's transaction (v8's trigger): its WAL, server CPU and latency.
#
# usage: insert_cost.sh ADMIN_URL VARIANT [TXNS=5000] [ROWS_PER_TXN=1] [SYNC=on]
#   SYNC  synchronous_commit for the client: on (each commit waits for its WAL flush, as an
#         application's would) or off (the statement's own cost, without the flush).
# Prints: WAL bytes/row, server CPU µs/row (bench/pg_cpu.sh, private_pg.sh's cluster), and
# pgbench's average latency per transaction and per row; then, after those, the time of TXNS
# single-row INSERT statements run in a loop inside the server (the statement and its triggers).
set -eu
admin=$1; variant=$2; txns=${3:-5000}; per=${4:-1}; sync=${5:-on}
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd)
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
db=walv_$RANDOM$RANDOM; base=${admin%/*}; url=$base/$db
psql "$admin" -qc "CREATE DATABASE $db" >/dev/null
script=$(mktemp)
trap 'rm -f "$script"; psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1' EXIT
q() { psql "$url" -qAt -v ON_ERROR_STOP=1 "$@"; }
for m in "$repo"/migrations/postgres/*.sql; do q -f "$m" >/dev/null 2>&1; done
q -f "$here/common.sql" >/dev/null
q -f "$here/variants/$variant.sql" >/dev/null 2>&1
cat > "$script" <<SQL
INSERT INTO prism_outbox (record_id, patch)
SELECT gen_random_uuid(), jsonb_build_object('default', jsonb_build_object('revision', g, 'email', 'r' || g || '@example.com'))
FROM generate_series(1, $per) g;
SQL
port=$(echo "$admin" | sed -n 's/.*:\([0-9]*\)\/.*/\1/p')
cpu_data=${PGDATA_DIR:-${TMPDIR:-/tmp}/prism-wal-pg-$port/data}
cpu() { [ -r "$cpu_data/postmaster.pid" ] && "$here/../pg_cpu.sh" "$cpu_data" || echo -; }
rows=$((txns * per))
lsn0=$(q -c 'SELECT pg_current_wal_lsn()'); cpu0=$(cpu)
out=$(PGOPTIONS="-c synchronous_commit=$sync" "$bin/pgbench" -n -M prepared -c 1 -t "$txns" -f "$script" "$url" 2>&1)
cpu1=$(cpu)
wal=$(q -c "SELECT round((pg_current_wal_lsn() - '$lsn0'::pg_lsn) / $rows)")
n=$(q -c 'SELECT count(*) FROM prism_outbox')
[ "$n" = "$rows" ] || { echo "$variant: $n rows inserted, expected $rows" >&2; echo "$out" >&2; exit 1; }
lat=$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p')
# The statement alone, in the server: TXNS single-row INSERT statements in one DO block (each fires
# a statement-level trigger once; no round trip, no commit per row), timed with clock_timestamp().
loop=$(q -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
    FOR g IN 1..$txns LOOP
        INSERT INTO prism_outbox (record_id, patch)
        VALUES (gen_random_uuid(), jsonb_build_object('default', jsonb_build_object('revision', g, 'email', 'r' || g || '@example.com')));
    END LOOP;
    RAISE NOTICE 'loop %', round(extract(epoch FROM clock_timestamp() - t0) * 1e6 / $txns, 1);
END \$\$" 2>&1 | sed -n 's/.*NOTICE:  loop //p')
echo "== $variant: $txns transactions of $per row(s), synchronous_commit=$sync"
echo "insert WAL bytes/row: $wal"
[ "$cpu0" = - ] || echo "server CPU: $(( (cpu1 - cpu0) * 1000 / rows )) µs/row"
echo "in-server loop of single-row INSERT statements: $loop µs/statement"
echo "latency: $lat ms/transaction, $(echo "$lat * 1000 / $per" | bc -l | xargs printf '%.1f') µs/row (pgbench, one client)"
