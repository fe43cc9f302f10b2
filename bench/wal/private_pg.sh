#!/usr/bin/env bash
# A private Postgres cluster for WAL measurements: WAL is one stream per server, so on a server that
# other sessions write to, pg_current_wal_lsn() deltas count their writes too. This cluster has the
# same WAL-relevant settings as this machine's server (wal_level, full_page_writes, wal_compression,
# shared_buffers, checkpoint_timeout, max_wal_size, autovacuum) and nothing else writing to it.
#
# usage: private_pg.sh start [PORT=5499]   prints the admin URL on stdout
#        private_pg.sh stop  [PORT=5499]
set -eu
cmd=${1:?start or stop}; port=${2:-5499}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
dir=${TMPDIR:-/tmp}/prism-wal-pg-$port
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case $cmd in
start)
    if [ ! -d "$dir" ]; then
        mkdir -p "$dir" && [ "$(id -u)" = 0 ] && chown postgres "$dir"
        as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
    fi
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start -o "-p $port -k $dir \
        -c listen_addresses=127.0.0.1 -c wal_level=replica -c full_page_writes=on \
        -c wal_compression=off -c shared_buffers=128MB -c checkpoint_timeout=5min \
        -c max_wal_size=1GB -c autovacuum=off -c fsync=on" >/dev/null
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    rm -rf "$dir"
    ;;
*) echo "usage: $0 start|stop [PORT]" >&2; exit 2 ;;
esac
