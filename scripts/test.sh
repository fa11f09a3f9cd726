#!/usr/bin/env bash
# The test command: installs the test requirements and the repository (editable) into ./.venv (created if
# missing) and runs the whole suite.
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -k rope    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
# the repository itself, editable, so the documentation's snippets (`import models_vit5`) work from any folder;
# offline (its build uses the setuptools of requirements-test.txt, its dependencies are in already)
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
exec .venv/bin/python -m pytest -q "$@"
