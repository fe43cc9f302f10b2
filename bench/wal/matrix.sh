#!/usr/bin/env bash
# Every variant of docs/database-cost.md, ROWS changes each, without and with a CHECKPOINT between
# fill and drain; prints one Markdown table row per run. Start a quiet server first:
#   url=$(bench/wal/private_pg.sh start) && bench/wal/matrix.sh "$url" 50000
# usage: matrix.sh ADMIN_URL [ROWS=50000] [RUNS=1]
set -eu
admin=$1; rows=${2:-50000}; runs=${3:-1}
here=$(cd "$(dirname "$0")" && pwd)
echo "| variant | fillfactor | fill (insert) B/row | drain B/row, no checkpoint | HOT share | drain B/row, checkpoint after fill |"
echo "|---|---|---|---|---|---|"
for spec in v0_current:100 v0_current:80 v2_hot:100 v2_hot:80 v2_hot:50 v3_batch_success:100 \
            v4_hot_batch_success:80 v4_hot_batch_success:50 v5_claims_table:100 v6_claims_lane_lock:100 \
            v7_batch_lane:85 v7_batch_lane:50 v8_queue:100 v8n_queue_no_history:100; do
    v=${spec%:*}; ff=${spec#*:}
    for _ in $(seq "$runs"); do
        a=$("$here/run_variant.sh" "$admin" "$v" "$rows" 0 "$ff")
        b=$("$here/run_variant.sh" "$admin" "$v" "$rows" 1 "$ff")
        fill=$(echo "$a" | sed -n 's/.*application.s insert: \([0-9]*\).*/\1/p')
        d0=$(echo "$a" | sed -n 's/^drain WAL bytes\/row: \([0-9]*\).*/\1/p')
        d1=$(echo "$b" | sed -n 's/^drain WAL bytes\/row: \([0-9]*\).*/\1/p')
        hot=$(echo "$a" | sed -n 's/^outbox updates: \([0-9]*\), HOT: \([0-9]*\)/\1 \2/p' |
              awk '{ print ($1 == 0) ? "no updates" : int(100 * $2 / $1 + 0.5) " %" }')
        echo "| $v | $ff | $fill | $d0 | $hot | $d1 |"
    done
done
