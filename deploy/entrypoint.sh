#!/bin/bash
# Start tritonserver the way `fire serve` does: explicit model control, the GPU profile
# (configs/gpu.pbtxt: TensorRT halves, KIND_GPU repair), and model control / repository / logging /
# trace endpoints restricted to holders of the admin key. Binds to all interfaces inside the pod;
# the Kubernetes Service decides who can reach it.
set -euo pipefail
set -f  # no pathname expansion: FIRE_LOAD_MODELS may be "*"
: "${FIRE_ADMIN_KEY:?set FIRE_ADMIN_KEY (a Kubernetes Secret in deploy/k8s) to protect model control}"
REPO="${FIRE_MODEL_REPOSITORY:-/models}"
LOAD="${FIRE_LOAD_MODELS:-*}"  # comma-separated model names, or * for every model in the repository
RESTRICTED="model-repository,logging,trace"
exec tritonserver \
  --model-repository="$REPO" \
  --model-control-mode=explicit \
  $(IFS=,; for m in $LOAD; do printf -- '--load-model=%s ' "$m"; done) \
  --model-config-name="${FIRE_PROFILE:-gpu}" \
  --strict-readiness=true \
  --exit-on-error=false \
  --http-restricted-api="$RESTRICTED:fire-admin-key=$FIRE_ADMIN_KEY" \
  --grpc-restricted-protocol="$RESTRICTED:fire-admin-key=$FIRE_ADMIN_KEY" \
  "$@"
