#!/bin/bash
# Roll a new direction file out to every replica of a protected model, one pod at a time, with zero
# failed requests: each pod validates the file against its deployment and hot-reloads it (`fire reload`).
# The repository volume is shared, so the first pod's atomic swap puts the file in place for all;
# the others reload it. A file a pod refuses stops the rollout (set -e) and is taken back on that pod;
# the other pods have not been touched.
#
#   deploy/rollout_directions.sh cifar10 /models/incoming/cifar10.safetensors [namespace]
set -euo pipefail
MODEL="$1"; FILE="$2"; NS="${3:-default}"
for pod in $(kubectl -n "$NS" get pods -l app.kubernetes.io/name=fire-triton -o jsonpath='{.items[*].metadata.name}'); do
  echo "== $pod"
  kubectl -n "$NS" exec "$pod" -c triton -- \
    fire reload --repo /models --model "$MODEL" --directions "$FILE"
done
echo "all pods serve $FILE for $MODEL"
