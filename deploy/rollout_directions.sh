#!/bin/bash
# Roll a new direction file out to every replica of a protected model, one pod at a time, with zero
# failed requests. Each pod serves its own copy of the repository (deploy/k8s: the copy-repository init
# container), so each pod checks the file against its own deployment and hot-reloads it there
# (`fire reload`, confirmed on the pod's metrics), and no other pod is touched. A pod that refuses the
# file stops the rollout: the pods already done put their previous file back (`fire reload
# --previous`), so every pod serves the old file again. After the last pod, a Job (deploy/promote-job.yaml,
# the only writer of the shared source; pods mount it read-only) promotes the file into the source
# repository (/models-src), which pods started later copy; pods that started during the rollout, from
# the old source, are then given the file too. benchmarks/fleet.py runs these steps on a loopback fleet
# (`fire bench fleet`, results/fleet.md). For the ensemble and folded models (a repair model's file);
# a fused model is swapped by version (`fire reload` on a server in explicit model-control mode) and is
# not rolled out by this script.
#
#   deploy/rollout_directions.sh cifar10 /models-src/incoming/cifar10.safetensors [namespace]
set -euo pipefail
MODEL="$1"; FILE="$2"; NS="${3:-default}"
for value in "$MODEL" "$FILE" "$NS"; do  # they go into a manifest and command lines: plain names and paths only
  [[ "$value" =~ ^[A-Za-z0-9_./-]+$ ]] || { echo "refusing ${value@Q}: letters, digits and _ . / - only" >&2; exit 2; }
done
pods() { kubectl -n "$NS" get pods -l app.kubernetes.io/name=fire-triton -o jsonpath='{.items[*].metadata.name}'; }
reload() { kubectl -n "$NS" exec "$1" -c triton -- fire reload --repo /models --model "$MODEL" "${@:2}"; }
DONE=()
for pod in $(pods); do
  echo "== $pod"
  if ! reload "$pod" --directions "$FILE"; then
    echo "$pod refused $FILE: putting the previous file back on ${#DONE[@]} pod(s)" >&2
    FAILED=()
    for back in "${DONE[@]}"; do
      reload "$back" --previous || FAILED+=("$back")
    done
    if [ ${#FAILED[@]} -gt 0 ]; then
      echo "STILL ON $FILE: ${FAILED[*]} (put the old file back there by hand: fire reload --directions OLD)" >&2
    fi
    exit 1
  fi
  DONE+=("$pod")
done
# every pod serves it: promote it into the source (checked again there, swapped atomically)
JOB="fire-promote-$(date +%s)"
sed -e "s|@JOB@|$JOB|" -e "s|@MODEL@|$MODEL|" -e "s|@FILE@|$FILE|" "$(dirname "$0")/promote-job.yaml" \
  | kubectl -n "$NS" create -f -
if ! kubectl -n "$NS" wait --for=condition=complete "job/$JOB" --timeout=300s; then
  echo "every pod serves $FILE but its promotion failed (kubectl -n $NS logs job/$JOB): new pods copy the old file" >&2
  exit 1
fi
# pods created while the rollout ran copied the old source: give them the file (a no-op where served)
for pod in $(pods); do
  [[ " ${DONE[*]} " == *" $pod "* ]] && continue
  echo "== $pod (started during the rollout)"
  reload "$pod" --directions "$FILE" || echo "$pod refused $FILE: it serves the old file; look at its log" >&2
done
echo "all pods serve $FILE for $MODEL; promoted into the source repository"
