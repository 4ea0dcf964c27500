#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): the gpu_torch profile on a lent GPU machine, which has torch
# but no tritonserver, no TensorRT and no network.
#
#   bash scripts/gpu_check.sh --cpu    here: prepare build/gpu_check (repository, reference batch, bundle),
#                                      then run the same checks on CPU (CPU profile, gpu_torch on CPU instances)
#   bash scripts/gpu_check.sh          on the GPU machine, with build/gpu_check carried:
#                                      device run --carry build/gpu_check "bash scripts/gpu_check.sh"
# Results: gpu_check.json and gpu_check.md in $OUT when set (the device tool's), else results/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--cpu" ]; then
  PY=.venv/bin/python
  [ -x "$PY" ] || bash scripts/setup.sh
  "$PY" -m benchmarks.gpu_check prepare
  exec "$PY" -m benchmarks.gpu_check run --cpu --out "${GPU_CHECK_OUT:-build/gpu_check/dry_run}"
fi
[ -f build/gpu_check/bundle.tar.xz ] || { echo "gpu_check: carry build/gpu_check (run --cpu here first)" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec python3 -m benchmarks.gpu_check run --out "${OUT:-results}"
