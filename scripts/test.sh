#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests and integration tests against a real tritonserver).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m pytest "$@"
