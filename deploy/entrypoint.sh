#!/bin/bash
# The triton container: `fire serve` as in development, so the container gets the same hardening.
# - the image's own tritonserver (NGC 24.10, with the TensorRT and Python backends), GPU profile;
# - no model control over the network; directions hot-reload from the mounted repository;
# - the admin key ($FIRE_ADMIN_KEY) and the inference key ($FIRE_INFERENCE_KEY: the gateway holds it
#   too), from a Secret, in no process's arguments; stubs' shm 0600;
# - supervised: a crashed server or stub is restarted, with backoff when it keeps crashing;
# - Triton listens on 127.0.0.1 inside the pod: clients reach it only through the gateway container.
set -euo pipefail
: "${FIRE_ADMIN_KEY:?set FIRE_ADMIN_KEY (a Kubernetes Secret in deploy/k8s) to protect the restricted APIs}"
: "${FIRE_INFERENCE_KEY:?set FIRE_INFERENCE_KEY (the same Secret, shared with the gateway) to protect inference}"
exec fire serve \
  --repo "${FIRE_MODEL_REPOSITORY:-/models}" \
  --profile "${FIRE_PROFILE:-gpu}" \
  --http-port 8000 --grpc-port 8001 --metrics-port 8002 \
  "$@"
