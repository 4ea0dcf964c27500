#!/bin/bash
# The gateway container: the pod's only open ports. Writes the HAProxy configuration for the protected
# models found in the mounted repository (`fire gateway`), then runs HAProxy in front of Triton
# (127.0.0.1 inside the pod), adding $FIRE_INFERENCE_KEY to the requests it lets through. With
# /tls/tls.pem mounted, HTTPS and gRPC over TLS; without it, plaintext only if FIRE_GATEWAY_PLAINTEXT=yes
# (TLS terminated in front of the pod), else it refuses to start.
set -euo pipefail
: "${FIRE_INFERENCE_KEY:?set FIRE_INFERENCE_KEY (the Secret the triton container has) for the gateway}"
REPO="${FIRE_MODEL_REPOSITORY:-/models}"
CFG="${FIRE_GATEWAY_CONFIG:-/tmp/fire-gateway/haproxy.cfg}"
TLS=()
if [ -f /tls/tls.pem ]; then TLS=(--tls-pem /tls/tls.pem);
elif [ "${FIRE_GATEWAY_PLAINTEXT:-}" = yes ]; then TLS=(--insecure); fi
fire gateway --repo "$REPO" --out "$CFG" --listen-http 0.0.0.0:9000 --listen-grpc 0.0.0.0:9001 \
  --listen-metrics 0.0.0.0:9002 "${TLS[@]}"
exec haproxy -W -db -f "$CFG"
