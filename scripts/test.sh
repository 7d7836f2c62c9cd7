#!/usr/bin/env bash
# Sets up, then runs the checks and the whole test suite (distributed tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
"$PYTHON" -m mypy gradwatch
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"
