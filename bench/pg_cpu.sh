#!/usr/bin/env bash
# CPU time a Postgres server spent, in milliseconds, for comparing server CPU per synced change:
# the postmaster's own and its reaped children's (cutime/cstime: backends that have exited, such
# as a daemon's connections once it stops) plus every live child's (backends, walwriter,
# checkpointer, ...). Take it before and after a run; the difference is the server's CPU for it.
# Like WAL, it is one figure per server: on a server that others use it counts their work too.
#
# usage: pg_cpu.sh PGDATA        (prints milliseconds; reads PGDATA/postmaster.pid and /proc)
set -eu
data=${1:?usage: pg_cpu.sh PGDATA}
pm=$(head -n1 "$data/postmaster.pid")
tck=$(getconf CLK_TCK)
# /proc/PID/stat: fields after the ")" that ends the command name; utime, stime, cutime, cstime
# are fields 14-17 of the whole line, 12-15 after it.
ticks() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk -v own="$2" '{ print $12 + $13 + (own ? $14 + $15 : 0) }'; }
total=$(ticks "$pm" 1)
for child in $(cat "/proc/$pm/task/"*/children 2>/dev/null); do
    t=$(ticks "$child" 0 || true)
    total=$((total + ${t:-0}))
done
echo $((total * 1000 / tck))
