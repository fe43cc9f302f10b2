#!/usr/bin/env bash
# WAL per synced row of one outbox variant, as raw SQL: a fresh database with the current schema
# (migrations/postgres/*.sql), the variant's DDL and its drain procedure, ROWS changes shaped as
# examples/bench.rs enqueues them, then the drain (claim up to 800 rows in batches of 100, store the
# batches, then write their outcomes, each step its own transaction) with every row succeeding.
#
# usage: run_variant.sh ADMIN_URL VARIANT [ROWS=50000] [CHECKPOINT=0] [FILLFACTOR=100]
#   VARIANT     a file in variants/ without .sql (v0_current, ...)
#   CHECKPOINT  1: CHECKPOINT after the fill, so that every page the drain touches is first written
#               as a full-page image (the worst case, as limit_pg.sh measures); 0: no checkpoint
#               between fill and drain (as examples/bench.rs measures, on a server that does not
#               checkpoint during the run).
#   FILLFACTOR  prism_outbox's fillfactor, set before the fill.
# Prints: the WAL of the drain per row, by statement class (from pg_current_wal_insert_lsn()
# around each statement) and by WAL record type (pg_walinspect), and the outbox's HOT share.
# Run it against a server nothing else writes to (private_pg.sh): WAL is one stream per server.
set -eu
admin=$1; variant=$2; rows=${3:-50000}; ckpt=${4:-0}; ff=${5:-100}
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd)
db=walv_$RANDOM$RANDOM; base=${admin%/*}; url=$base/$db
psql "$admin" -qc "CREATE DATABASE $db" >/dev/null
trap 'psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1' EXIT
q() { psql "$url" -qAt -v ON_ERROR_STOP=1 "$@"; }
for m in "$repo"/migrations/postgres/*.sql; do q -f "$m" >/dev/null 2>&1; done
q -c 'CREATE EXTENSION IF NOT EXISTS pg_walinspect' >/dev/null
q -f "$here/common.sql" >/dev/null
q -f "$here/variants/$variant.sql" >/dev/null
q -c "ALTER TABLE prism_outbox SET (fillfactor = $ff)" >/dev/null
fill0=$(q -c 'SELECT pg_current_wal_lsn()')
# The application's insert, as examples/bench.rs makes it: one change per record. One statement
# (psql's \timing: its round trip, commit included).
fill_ms=$(q -c '\timing on' -c "INSERT INTO prism_outbox (record_id, patch)
      SELECT gen_random_uuid(), jsonb_build_object('default', jsonb_build_object('revision', g, 'email', 'r' || g || '@example.com'))
      FROM generate_series(0, $rows - 1) g" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')
fill=$(q -c "SELECT round((pg_current_wal_lsn() - '$fill0'::pg_lsn) / $rows)")
[ "$ckpt" = 1 ] && q -c 'CHECKPOINT' >/dev/null
read -r lsn0 upd0 hot0 < <(q -F' ' -c "SELECT pg_current_wal_lsn(), n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'prism_outbox'")
# The server's CPU during the drain (bench/pg_cpu.sh), where its data directory is known: the
# private cluster's (private_pg.sh, from the URL's port), or PGDATA_DIR.
port=$(echo "$admin" | sed -n 's/.*:\([0-9]*\)\/.*/\1/p')
cpu_data=${PGDATA_DIR:-${TMPDIR:-/tmp}/prism-wal-pg-$port/data}
cpu() { [ -r "$cpu_data/postmaster.pid" ] && "$here/../pg_cpu.sh" "$cpu_data" || echo -; }
cpu0=$(cpu)
steps=$(q -c "CALL wal_drain(800, 100)" 2>&1 | sed -n 's/^.*NOTICE:  //p')
sleep 1  # the cumulative statistics are published when the backend goes idle
cpu1=$(cpu)  # after the sleep: the drain's backend has exited and been reaped (counted in cutime)
read -r lsn1 upd1 hot1 left < <(q -F' ' -c "SELECT pg_current_wal_lsn(), n_tup_upd, n_tup_hot_upd,
    (SELECT count(*) FROM prism_outbox_state WHERE state NOT IN ('succeeded', 'dead')) FROM pg_stat_user_tables WHERE relname = 'prism_outbox'")
[ "$left" = 0 ] || { echo "$variant: $left rows not terminal" >&2; exit 1; }
# Every row went out exactly once, in a batch that is done; a queue (v8) is empty.
read -r sent open < <(q -F' ' -c "SELECT COALESCE(sum(row_count), 0), count(*) FILTER (WHERE state <> 'done') FROM prism_batches")
[ "$sent" = "$rows" ] && [ "$open" = 0 ] || { echo "$variant: batches hold $sent rows, $open not done" >&2; exit 1; }
queued=-
if [ "$(q -c "SELECT to_regclass('prism_outbox_queue') IS NOT NULL")" = t ]; then
    queued=$(q -c 'SELECT count(*) FROM prism_outbox_queue')
    [ "$queued" = 0 ] || { echo "$variant: $queued rows left in prism_outbox_queue" >&2; exit 1; }
fi
total=$(q -c "SELECT round(('$lsn1'::pg_lsn - '$lsn0'::pg_lsn) / $rows)")
echo "== $variant, fillfactor $ff, $rows rows, checkpoint after fill: $ckpt"
echo "drain WAL bytes/row: $total   (fill, the application's insert: $fill bytes/row)"
echo "fill time: $fill_ms ms, $(echo "$fill_ms * 1000 / $rows" | bc -l | xargs printf '%.1f') µs/row (one INSERT of $rows rows, commit included)"
echo "outbox updates: $((upd1 - upd0)), HOT: $((hot1 - hot0))"
echo "checked: batches hold $sent rows, all done; queue rows left: $queued"
[ "$cpu0" = - ] || echo "server CPU: $(( (cpu1 - cpu0) * 1000 / rows )) µs/row (bench/pg_cpu.sh; the drain procedure's own tally included)"
echo "by statement (bytes/row, then the backend's time per row):"; echo "$steps" | sed 's/^/  /'
echo "by WAL record type (bytes/row, of which full-page images):"
q -F' ' -c "SELECT '  ' || rpad(\"resource_manager/record_type\", 28), round(combined_size::numeric / $rows),
                  '(fpi ' || round(fpi_size::numeric / $rows) || ')'
           FROM pg_get_wal_stats('$lsn0', '$lsn1', true) WHERE combined_size > 0
           ORDER BY combined_size DESC LIMIT 12"
