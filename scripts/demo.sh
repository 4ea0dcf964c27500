#!/usr/bin/env bash
# Install, then run the main job: protect the bundled backdoored CIFAR-10 model with FIRE, serve it on
# Triton (127.0.0.1), and print CA / ASR / PA with and without FIRE, measured through the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/fire demo "$@"
