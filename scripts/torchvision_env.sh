#!/usr/bin/env bash
# A separate environment with torchvision, only for making the "own model" benchmark's torchvision model
# (benchmarks/own_model/train_torchvision.py). torchvision does not import beside the project's CPU torch
# build (torch 2.13.0+cpu); torch 2.14.1 and torchvision 0.29.1 do pair. FIRE itself never needs torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-torchvision/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-torchvision
fi
.venv-torchvision/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" "numpy<2" onnx pillow tqdm
