#!/usr/bin/env bash
# The test command: installs requirements into ./.venv (created if missing) and runs the whole suite.
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -k rope    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
exec .venv/bin/python -m pytest -q "$@"
