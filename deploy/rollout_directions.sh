#!/bin/bash
# Roll a new direction file out to every replica of a protected model, one pod at a time, with zero
# failed requests. Each pod serves its own copy of the repository (deploy/k8s: the copy-repository init
# container), so each pod checks the file against its own deployment and hot-reloads it there
# (`fire reload`, confirmed on the pod's metrics), and no other pod is touched. A pod that refuses the
# file stops the rollout: the pods already done put their previous file back (`fire reload
# --previous`), so every pod serves the old file again. After the last pod, the file is promoted into
# the shared source repository (/models-src), which pods started later copy. benchmarks/fleet.py runs
# these steps on a loopback fleet (`fire bench fleet`, results/fleet.md). For the ensemble and folded
# models (a repair model's file); a fused model is swapped by version (`fire reload` on a server in
# explicit model-control mode) and is not rolled out by this script. Pods created or restarted during
# a rollout copy the source, which holds the old file until the promotion: run it again for them.
#
#   deploy/rollout_directions.sh cifar10 /models-src/incoming/cifar10.safetensors [namespace]
set -euo pipefail
MODEL="$1"; FILE="$2"; NS="${3:-default}"
PODS=$(kubectl -n "$NS" get pods -l app.kubernetes.io/name=fire-triton -o jsonpath='{.items[*].metadata.name}')
DONE=()
for pod in $PODS; do
  echo "== $pod"
  if ! kubectl -n "$NS" exec "$pod" -c triton -- fire reload --repo /models --model "$MODEL" --directions "$FILE"; then
    echo "$pod refused $FILE: putting the previous file back on ${#DONE[@]} pod(s)" >&2
    FAILED=()
    for back in "${DONE[@]}"; do
      kubectl -n "$NS" exec "$back" -c triton -- fire reload --repo /models --model "$MODEL" --previous \
        || FAILED+=("$back")
    done
    if [ ${#FAILED[@]} -gt 0 ]; then
      echo "STILL ON $FILE: ${FAILED[*]} (put the old file back there by hand: fire reload --directions OLD)" >&2
    fi
    exit 1
  fi
  DONE+=("$pod")
done
# every pod serves it: promote it into the source (checked again, swapped atomically; no server to ask)
first=${DONE[0]}
kubectl -n "$NS" exec "$first" -c triton -- \
  fire reload --repo /models-src --model "$MODEL" --directions "$FILE" --metrics-url ''
echo "all pods serve $FILE for $MODEL; promoted into the source repository"
