#!/usr/bin/env bash
# Start a PostgreSQL of spoolq's own on this machine (a data directory and a port of its own,
# listening on 127.0.0.1, trust authentication for local connections), create the database
# `spoolq`, migrate it, and print its URL. Safe to run again: what exists is reused.
#
#   scripts/pg-local.sh [DATA_DIR] [PORT]     default: ~/.local/state/spoolq-pg, port 5433
#   scripts/pg-local.sh --stop [DATA_DIR]
#
# For trying the PostgreSQL store on one machine (the README's two commands). A production
# database is yours to run; point spoolq at it with --store postgresql://user@host/db.
set -euo pipefail
cd "$(dirname "$0")/.."
stop=0
if [ "${1:-}" = --stop ]; then stop=1; shift; fi
data=${1:-$HOME/.local/state/spoolq-pg}
port=${2:-5433}
say() { printf 'pg-local: %s\n' "$*" >&2; }

scripts/bootstrap.sh run
bin=""
for d in "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")" $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
  if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then bin=$d; break; fi
done
if [ -z "$bin" ]; then
  say "installing Debian's postgresql"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || true
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -rV | head -1)
fi

as=()
if [ "$(id -u)" -eq 0 ]; then  # PostgreSQL refuses to run as root
  as=(runuser -u postgres --)
  mkdir -p "$data" && chown postgres: "$data" && chmod 0700 "$data"
fi
if [ $stop -eq 1 ]; then
  "${as[@]}" "$bin/pg_ctl" stop -D "$data" -m fast >&2
  exit 0
fi
if [ ! -f "$data/PG_VERSION" ]; then
  say "initdb $data"
  "${as[@]}" "$bin/initdb" -D "$data" --auth=trust -U postgres --encoding=UTF8 >/dev/null
fi
if ! "${as[@]}" "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; then
  say "starting PostgreSQL on 127.0.0.1:$port"
  "${as[@]}" "$bin/pg_ctl" start -w -D "$data" -l "$data/server.log" \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$data" >&2
fi
url="postgresql://postgres@127.0.0.1:$port/spoolq"
.venv/bin/python - "$port" <<'PY'
import sys, psycopg
with psycopg.connect(f"postgresql://postgres@127.0.0.1:{sys.argv[1]}/postgres", autocommit=True) as c:
    if c.execute("SELECT 1 FROM pg_database WHERE datname = 'spoolq'").fetchone() is None:
        c.execute("CREATE DATABASE spoolq")
PY
.venv/bin/spoolq --store "$url" db migrate >&2
echo "$url"
