#!/usr/bin/env bash
# Runs every benchmark the README reports, one after another (they are not timed tests: run them
# on a quiet machine). Needs Postgres at PRISM_SYNC_TEST_DATABASE_URL (default: local trust auth).
# Each daemon run checks that every change succeeded and was applied exactly once, and exits
# non-zero (stopping this script) with what it found if not.
#   ci/bench-all.sh [quick]      quick: smaller sizes, for a smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
export PRISM_SYNC_TEST_DATABASE_URL=${PRISM_SYNC_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
cargo build --release --locked --bin prism-sync --example bench
B=target/release/examples/bench
n=200000; big=1000000; finished=5000000
if [[ ${1:-} == quick ]]; then n=20000; big=50000; finished=100000; fi
run() { echo; echo "\$ bench $*"; "$B" "$@"; }
run --db sqlite --rows $n
run --db postgres --rows $n
run --db sqlite --rows $((n / 2)) --latency 50ms --no-limit
run --db postgres --rows $((n / 2)) --latency 50ms --no-limit
run --db postgres --rows $((n / 2)) --faults mild --no-limit
run --db sqlite --rows $((n / 2)) --faults mild --no-limit
run --db postgres --rows $((n / 4)) --records $((n / 40)) --no-limit
run --db postgres --rows $((n / 4)) --latency 50ms --replicas 1 --max-in-flight 2 --no-limit
run --db postgres --rows $((n / 4)) --latency 50ms --replicas 3 --max-in-flight 2 --no-limit
# Latency on a quiet disk: right after the runs above, this machine's fsync stalls for up to a
# second now and then, and a lone change waits for two commits.
sync; sleep 5
run --db sqlite --mode latency
sync; sleep 5
run --db postgres --mode latency
# Batch fill: three replicas, a trickle with 5 % retryable item errors; without and with the linger.
run --db postgres --mode fill --replicas 3 --linger 0s
run --db postgres --mode fill --replicas 3
run --db sqlite --rows $big --no-limit
run --db postgres --mode claim-cost --finished-rows $finished
run --db sqlite --mode claim-cost --finished-rows $finished
