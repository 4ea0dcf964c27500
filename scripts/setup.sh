#!/usr/bin/env bash
# Create .venv (if missing) and install FIRE with everything it needs: torch 2.13.0 (CPU build here),
# nvidia-pytriton 0.7.0 (tritonserver 2.51), tritonclient, onnxruntime, locust, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
