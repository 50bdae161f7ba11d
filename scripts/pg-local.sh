#!/usr/bin/env bash
# Throwaway PostgreSQL 15 on 127.0.0.1:$PGPORT, data under $PG_BASE, run as the 'postgres' OS user:
# the shared Optuna storage (and MLflow backend store) of the cluster tests (make test-cluster).
#   bash pg-local.sh start | stop        DSN: postgresql://postgres@127.0.0.1:54329/ci
set -euo pipefail
PG_BASE=${PG_BASE:-/tmp/bnsweep-pg}
PGPORT=${PGPORT:-54329}
PGBIN=/usr/lib/postgresql/15/bin
case "${1:-}" in
start)
  if ! dpkg -s postgresql-15 >/dev/null 2>&1; then
    [ -n "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial)" ] || apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15
  fi
  mkdir -p "$PG_BASE" && chown postgres:postgres "$PG_BASE"
  if [ ! -f "$PG_BASE/data/PG_VERSION" ]; then
    runuser -u postgres -- "$PGBIN/initdb" -D "$PG_BASE/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$PG_BASE/initdb.log"
  fi
  # unix socket in $PG_BASE (not /var/run/postgresql), TCP only on loopback
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG_BASE/data" -l "$PG_BASE/server.log" -w -t 30 \
    -o "-p $PGPORT -c listen_addresses=127.0.0.1 -k $PG_BASE -c fsync=off" start
  runuser -u postgres -- psql -h 127.0.0.1 -p "$PGPORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='ci'" | grep -q 1 \
    || runuser -u postgres -- createdb -h 127.0.0.1 -p "$PGPORT" -U postgres ci
  echo "postmaster pid $(head -1 "$PG_BASE/data/postmaster.pid"); DSN: postgresql://postgres@127.0.0.1:$PGPORT/ci"
  ;;
stop)
  [ -f "$PG_BASE/data/postmaster.pid" ] || exit 0
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG_BASE/data" -m fast -w stop
  ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
