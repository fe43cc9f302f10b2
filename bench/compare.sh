#!/usr/bin/env bash
# prism-sync side by side with the two fixed references of ../shared/bench (see its README), on
# this machine's Postgres, interleaved round by round so that the machine's load falls on all of
# them alike:
#   (a) prism-sync's release bench (examples/bench.rs, default throughput mode, simulator at 0 ms,
#       one daemon, --no-limit) for each binary given, e.g. main's build and this branch's;
#   (b) the naive raw-SQL loop, naive_reference/limit_pg.sh (pgbench, 4 clients, 15 s);
#   (c) Graphile Worker with its batching options, peer_graphile/run.sh with BATCH=1.
# Each run's rows/s and WAL bytes per row are printed, then per system the median and min–max,
# and per prism binary the ratios prism ÷ naive and prism ÷ Graphile of each round (same round),
# with their median and min–max; and prism's server CPU per row (when the bench can read the
# server's data directory, e.g. as root), with each build's ratio to the first one given. The load average is printed before every round.
#
# usage: bench/compare.sh [--prism LABEL=DIR]... [--rounds 3] [--rows 200000] [--refs DIR]
#   DIR holds `prism-sync` and `examples/bench` (a cargo release folder, or a copy of one):
#     cargo build --release --example bench --bin prism-sync
#     mkdir -p /tmp/before/examples && cp target/release/prism-sync /tmp/before/ \
#       && cp target/release/examples/bench /tmp/before/examples/ && cp -r config /tmp/before/
#   (config/: the build's own default configuration, which it is run beside)
#     bench/compare.sh --prism before=/tmp/before --prism after=target/release
#   Default: --prism this=${CARGO_TARGET_DIR:-target}/release.
#   --refs: the references' folder (default ../shared/bench next to the repository, or
#   /work/shared/bench). Postgres: PRISM_SYNC_TEST_DATABASE_URL (default
#   postgres://postgres@127.0.0.1:5432/postgres), as for the bench and the tests.
#
# WAL per row: the bench and the naive loop read pg_current_wal_lsn() around the drain alone
# (server-wide). Graphile's script reports none; here it is read around the whole script (schema,
# enqueue of the N jobs and the drain) and divided by N, so it is an upper bound for its drain.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3 rows=200000 prisms=() refs=""
while [ $# -gt 0 ]; do
  case $1 in
    --prism) prisms+=("$2"); shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --rows) rows=$2; shift 2 ;;
    --refs) refs=$2; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#prisms[@]} -gt 0 ] || prisms=("this=${CARGO_TARGET_DIR:-target}/release")
if [ -z "$refs" ]; then
  for d in ../shared/bench /work/shared/bench; do [ -d "$d/naive_reference" ] && refs=$d && break; done
fi
[ -n "$refs" ] && [ -x "$refs/naive_reference/limit_pg.sh" -o -f "$refs/naive_reference/limit_pg.sh" ] \
  || { echo "the references (naive_reference/, peer_graphile/) not found; pass --refs DIR" >&2; exit 2; }
refs=$(cd "$refs" && pwd)
admin=${PRISM_SYNC_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export PRISM_SYNC_TEST_DATABASE_URL=$admin
base=${admin%/*}
for p in "${prisms[@]}"; do
  dir=${p#*=}
  for f in "$dir/prism-sync" "$dir/examples/bench"; do
    [ -x "$f" ] || { echo "$f missing: cargo build --release --example bench --bin prism-sync" >&2; exit 2; }
  done
done

results=$(mktemp) cpus=$(mktemp)
trap 'rm -f "$results" "$cpus"' EXIT
lsn() { psql -qAtX "$admin" -c 'SELECT pg_current_wal_lsn()'; }
wal_since() { psql -qAtX "$admin" -c "SELECT round((pg_current_wal_lsn() - '$1'::pg_lsn) / $2::numeric)"; }
record() { # round system rows/s wal/row
  echo "$1 $2 $3 $4" >>"$results"
  printf '  round %s  %-22s %9s rows/s   WAL %6s B/row\n' "$1" "$2" "$3" "$4"
}

run_prism() { # round label dir
  local out rate wal
  # A build reads its default configuration from ./config: a folder with its own config/ (the
  # source's, copied beside the binaries) is run from there, so an older build is not handed a
  # newer build's settings, which it refuses.
  out=$(cd "$([ -d "$3/config" ] && echo "$3" || pwd)" &&
        "$3/examples/bench" --db postgres --rows "$rows" --no-limit --bin "$3/prism-sync" 2>&1) \
    || { echo "$out" >&2; echo "prism-sync bench ($2) failed" >&2; exit 1; }
  rate=$(echo "$out" | sed -n 's/^ *daemon: *\([0-9]*\) rows\/s.*/\1/p' | head -n1)
  wal=$(echo "$out" | sed -n 's/^ *daemon WAL: \([0-9]*\) bytes per row.*/\1/p' | head -n1)
  cpu=$(echo "$out" | sed -n 's/^ *daemon server CPU: \([0-9]*\) µs per row.*/\1/p' | head -n1)
  record "$1" "prism:$2" "$rate" "${wal:-?}"
  if [ -n "$cpu" ]; then
    echo "$1 prism:$2 $cpu" >>"$cpus"
    printf '  round %s  %-22s server CPU %s µs/row\n' "$1" "prism:$2" "$cpu"
  fi
}

run_naive() { # round
  local err rate wal
  err=$(mktemp)
  rate=$(bash "$refs/naive_reference/limit_pg.sh" "$admin" 2>"$err") \
    || { cat "$err" >&2; echo "naive reference failed" >&2; exit 1; }
  wal=$(sed -n 's/^wal bytes per row \([0-9]*\).*/\1/p' "$err" | head -n1)
  rm -f "$err"
  record "$1" naive "$rate" "${wal:-?}"
}

run_graphile() { # round
  local before out rate n
  before=$(lsn)
  out=$(BATCH=1 PG_BASE=$base bash "$refs/peer_graphile/run.sh" 2>&1) \
    || { echo "$out" >&2; echo "Graphile reference failed" >&2; exit 1; }
  rate=$(echo "$out" | tail -n1 | sed -n 's/.* = \([0-9.]*\) jobs\/s.*/\1/p')
  n=$(echo "$out" | tail -n1 | sed -n 's/^graphile-worker: \([0-9]*\) jobs.*/\1/p')
  record "$1" graphile "${rate%.*}" "$(wal_since "$before" "${n:-100000}")"
}

echo "compare: ${prisms[*]}, naive (limit_pg.sh), graphile (BATCH=1); $rounds round(s), $rows changes; $(nproc) cores"
for r in $(seq 1 "$rounds"); do
  echo "round $r: load average $(cut -d' ' -f1-3 /proc/loadavg)"
  # The order turns each round, so that no system always runs first (or right after another).
  systems=()
  for p in "${prisms[@]}"; do systems+=("prism $p"); done
  systems+=(naive graphile)
  k=${#systems[@]}
  for i in $(seq 0 $((k - 1))); do
    s=${systems[$(((i + r - 1) % k))]}
    case $s in
      prism\ *) p=${s#prism }; run_prism "$r" "${p%%=*}" "${p#*=}" ;;
      naive) run_naive "$r" ;;
      graphile) run_graphile "$r" ;;
    esac
  done
done
echo "after: load average $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$results" "$cpus" <<'PY'
import statistics, sys
runs = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for r, system, rate, wal in runs:
    by.setdefault(system, {})[int(r)] = (float(rate), None if wal == "?" else float(wal))
def spread(xs, fmt):
    return f"median {fmt(statistics.median(xs))}  ({fmt(min(xs))}–{fmt(max(xs))})"
n = lambda x: f"{x:,.0f}"
print("\nsummary (rows/s; WAL bytes per row)")
for system, rs in by.items():
    rates = [v[0] for v in rs.values()]
    wals = [v[1] for v in rs.values() if v[1] is not None]
    line = f"  {system:<22} rows/s {spread(rates, n)}"
    if wals:
        line += f"   WAL {spread(wals, n)}"
    print(line)
print("ratios, same round (median (min–max))")
for system, rs in by.items():
    if not system.startswith("prism:"):
        continue
    for ref, goal in (("naive", 1.2), ("graphile", 2.0)):
        ratios = [rs[r][0] / by[ref][r][0] for r in rs if r in by.get(ref, {}) and by[ref][r][0] > 0]
        if ratios:
            each = ", ".join(f"{x:.2f}" for x in ratios)
            print(f"  {system} ÷ {ref:<8} {spread(ratios, lambda x: f'{x:.2f}')}   per round: {each}   (goal ≥ {goal})")
# Server CPU per synced row (all of the server's processes, read by the bench where it can read
# the server's data directory), and each prism build's ÷ the first one given, same round.
cpu = {}
for line in open(sys.argv[2]):
    r, system, us = line.split()
    cpu.setdefault(system, {})[int(r)] = float(us)
if cpu:
    print("server CPU per row (µs), and ÷ the first prism build given, same round")
    first = next(iter(cpu))
    for system, rs in cpu.items():
        line = f"  {system:<22} {spread(list(rs.values()), n)}"
        if system != first:
            ratios = [rs[r] / cpu[first][r] for r in rs if r in cpu[first] and cpu[first][r] > 0]
            if ratios:
                each = ", ".join(f"{x:.2f}" for x in ratios)
                line += f"   ÷ {first}: {spread(ratios, lambda x: f'{x:.2f}')}   per round: {each}"
        print(line)
PY
