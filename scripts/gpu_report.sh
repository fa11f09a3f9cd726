#!/usr/bin/env bash
# The GPU report in one command (scripts/gpu_report.py says what it runs); fits one 10-minute GPU run.
#   bash scripts/gpu_report.sh                                   # writes gpu_report/gpu_report.{md,json}
#   bash scripts/gpu_report.sh --sections knobs cudagraphs --out gpu_report_2
# PYTHON picks the interpreter (default: python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
exec "$PY" scripts/gpu_report.py "$@"
