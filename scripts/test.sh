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
python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "test: pytest collected no tests -- failing" >&2
  exit 1
fi
exit $rc
