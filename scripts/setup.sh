#!/usr/bin/env bash
# Create .venv (if missing) and install FIRE with everything it needs: torch 2.13.0 (CPU build here),
# nvidia-pytriton 0.7.0 (tritonserver 2.51), tritonclient, onnxruntime, locust, pytest; and NVIDIA's
# perf_analyzer (fire bench serving) beside the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
# perf_analyzer links libb64 (Debian's libb64-0d); the binary comes from the tritonclient 2.41.0 wheel.
if [ ! -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq libb64-0d || (apt-get update -qq && apt-get install -y -qq libb64-0d)) >/dev/null 2>&1 \
    || echo "could not install libb64-0d: perf_analyzer (fire bench serving) will not start"
fi
.venv/bin/python -m benchmarks.perf_analyzer install || true
