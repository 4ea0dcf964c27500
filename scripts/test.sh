#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests and integration tests against a real tritonserver).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The gateway tests run a real HAProxy (Debian's, with Lua); without it they skip and say why.
if ! command -v haproxy >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq haproxy || (apt-get update -qq && apt-get install -y -qq haproxy)) >/dev/null 2>&1 \
    || echo "could not install haproxy: the gateway tests will skip"
fi
.venv/bin/ruff check .
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m pytest "$@"
