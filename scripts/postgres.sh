#!/usr/bin/env bash
# A throw-away PostgreSQL 15 for benches and trying freezeframe on a server database (Debian's
# postgresql-15 and python3-psycopg; scripts/setup.sh installs both):
#
#   bash scripts/postgres.sh start DIR [--tcp]   # initdb + start in DIR (created, must be empty),
#                                                # print the URL of its database "freezeframe"
#   bash scripts/postgres.sh url DIR             # print that URL again
#   bash scripts/postgres.sh stop DIR            # stop it by the PID in DIR/data/postmaster.pid,
#                                                # remove DIR
#
# The server runs as the `postgres` system account (PostgreSQL refuses root; `nobody` when there
# is no such account), listens on a unix socket in DIR (and on 127.0.0.1 at a free port with
# --tcp), trusts local connections and runs without fsync: for tests and benches only, never
# for a catalog you want to keep. No systemd, no pg_ctlcluster. Use it as
#
#   url=$(bash scripts/postgres.sh start /tmp/ffpg)
#   .venv/bin/freezeframe --database-url "$url" vm list
#   bash scripts/postgres.sh stop /tmp/ffpg
#
# The test suite does not use this script: tests/conftest.py starts one server per session
# itself (freezeframe.testing.postgres). Exit status: 0 done, 1 failed, 2 usage.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ $# -lt 2 || ! $1 =~ ^(start|stop|url)$ ]]; then
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
exec "$PY" -m freezeframe.testing.postgres "$@"
