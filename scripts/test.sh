#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run the whole test suite: lint, format, types, then
# pytest (unit tests with fakes on real sockets, integration tests on real lab VMs).
# pytest's "no tests collected" (exit 5) is a failure here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
mypy
set +e
# Two workers (pytest-xdist): the suite mostly waits on TCG guests, Ceph and subprocesses, so
# two at once nearly halve its wall time on 2 cores. Session daemons are shared by the workers
# and tests that share a costly fixture stay on one worker (tests/shared_daemons.py; that needs
# --dist loadgroup). FF_TEST_WORKERS=0 runs it in one process; arguments given here come last
# (`-n 0` works too).
python -m pytest -n "${FF_TEST_WORKERS:-2}" --dist loadgroup "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "test: pytest collected no tests -- failing" >&2
  exit 1
fi
exit $rc
