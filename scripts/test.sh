#!/usr/bin/env bash
# Set up (if needed) and run the test suite on the real data in $RSDET_DATA (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RSDET_DATA="${RSDET_DATA:-$(cd .. && pwd)/shared/data}"
export YOLO_OFFLINE=1
.venv/bin/ruff check rsdet_compress tests benchmarks   # lint first: seconds, and CI fails on it
exec .venv/bin/python -m pytest -q --durations=30 "$@"   # the slowest tests, for the suite-time budget
