#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests: its own data directory, loopback only, trust auth, a free port.
#   eval "$(.ci/postgres.sh start)"   # exports NEMOTRON_FAST_TEST_PG (the URL) and NEMOTRON_FAST_PG_DIR
#   .ci/postgres.sh stop "$NEMOTRON_FAST_PG_DIR"
# Installs Debian's postgresql package when no server is found (needs root). PostgreSQL refuses to run as root:
# as root the server runs as the 'postgres' system user the package creates.
set -euo pipefail

find_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$dir" ] && command -v pg_ctl >/dev/null 2>&1; then dir=$(dirname "$(command -v pg_ctl)"); fi
  echo "$dir"
}

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  start)
    bin=$(find_bin)
    if [ -z "$bin" ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
      bin=$(find_bin)
    fi
    [ -n "$bin" ] || { echo "postgres.sh: no PostgreSQL server found or installed" >&2; exit 1; }
    dir=$(mktemp -d /tmp/nemotron-fast-pg.XXXXXX)
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 >/dev/null
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o \
      "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" start >&2
    echo "export NEMOTRON_FAST_TEST_PG=postgresql://postgres@127.0.0.1:$port/postgres NEMOTRON_FAST_PG_DIR=$dir"
    ;;
  stop)
    dir=${2:?usage: postgres.sh stop DIR}
    bin=$(find_bin)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    rm -rf "$dir"
    ;;
  *)
    echo "usage: $0 start | stop DIR" >&2; exit 2 ;;
esac
