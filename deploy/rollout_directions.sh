#!/usr/bin/env bash
# Roll a new direction file out to every replica of a protected model, one pod at a time, with zero
# failed requests. Each pod serves its own copy of the repository (deploy/k8s: the copy-repository init
# container), so each pod checks the file against its own deployment and hot-reloads it there
# (`fire reload`, confirmed on the pod's metrics), and no other pod is touched. A pod that refuses the
# file, or an interrupted rollout, stops it: the pods already done put their previous file back (`fire
# reload --previous`), so every pod serves the old file again (a pod whose `kubectl exec` drops after
# its swap but before its confirmation is the one case left to the operator: the script says which). After the last pod, a Job
# (deploy/promote-job.yaml, the only writer of the shared source; pods mount it read-only) promotes the
# file into the source repository (/models-src), which pods started later copy; pods that started
# during the rollout, from the old source, are then given the file too (once ready). The new file is
# read from the shared volume, where the operator puts it (e.g. `incoming/`, with their own writer: the
# pods cannot). benchmarks/fleet.py runs these steps on a loopback fleet (`fire bench fleet`,
# results/fleet.md). For the ensemble and folded models (a repair model's file); a fused model is
# swapped by version (`fire reload` on a server in explicit model-control mode), not by this script.
#
#   deploy/rollout_directions.sh cifar10 /models-src/incoming/cifar10.safetensors [namespace]
set -euo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then echo "needs bash >= 4.4" >&2; exit 2; fi
if (($# < 2)); then echo "usage: $0 MODEL /models-src/PATH/FILE.safetensors [NAMESPACE]" >&2; exit 2; fi
MODEL="$1"; FILE="$2"; NS="${3:-default}"
# they go into a manifest and command lines: plain names, and a file on the shared volume
[[ "$MODEL" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || { echo "refusing model name ${MODEL@Q}" >&2; exit 2; }
[[ "$NS" =~ ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]] || { echo "refusing namespace ${NS@Q}" >&2; exit 2; }
[[ "$FILE" =~ ^/models-src/[A-Za-z0-9_./-]+$ && "$FILE" != *..* ]] \
  || { echo "refusing ${FILE@Q}: a file under /models-src/ (letters, digits, _ . / -; no ..)" >&2; exit 2; }
pods() {  # the running pods; an empty or failed listing stops the script (nothing checked, nothing promoted)
  local names
  names=$(kubectl -n "$NS" get pods -l app.kubernetes.io/name=fire-triton --field-selector=status.phase=Running \
    -o jsonpath='{.items[*].metadata.name}')
  [ -n "$names" ] || { echo "no running fire-triton pods in namespace $NS" >&2; return 1; }
  echo "$names"
}
reload() { kubectl -n "$NS" exec "$1" -c triton -- fire reload --repo /models --model "$MODEL" "${@:2}"; }
DONE=()
undo() {  # the pods done put their previous file back
  local failed=()
  echo "putting the previous file back on ${#DONE[@]} pod(s)" >&2
  for back in "${DONE[@]}"; do reload "$back" --previous || failed+=("$back"); done
  if ((${#failed[@]})); then
    echo "STILL ON $FILE: ${failed[*]} (put the old file back there by hand: fire reload --directions OLD)" >&2
  fi
}
PODS=$(pods)
trap 'echo "interrupted" >&2; undo; exit 130' INT TERM
for pod in $PODS; do
  echo "== $pod"
  # a pod that refuses the file, or does not confirm it in time, puts its old file back itself
  if ! reload "$pod" --directions "$FILE"; then
    echo "$pod did not take $FILE (had its kubectl exec dropped, see what it serves: fire_direction_checksum)" >&2
    undo
    exit 1
  fi
  DONE+=("$pod")
done
trap - INT TERM
# every pod serves it: promote it into the source (checked again there, swapped atomically)
JOB="fire-promote-$(date +%s)-$RANDOM"
sed -e "s|@JOB@|$JOB|" -e "s|@MODEL@|$MODEL|" -e "s|@FILE@|$FILE|" "$(dirname "$0")/promote-job.yaml" \
  | kubectl -n "$NS" create -f -
for _ in $(seq 600); do  # a failed Job ends the wait at once; a slow image pull gets 10 minutes
  state=$(kubectl -n "$NS" get job "$JOB" -o jsonpath='{.status.succeeded}/{.status.failed}')
  [[ "$state" == 1/* || "$state" == */1 ]] && break
  sleep 1
done
if [[ "$state" != 1/* ]]; then
  echo "every pod serves $FILE but its promotion did not succeed ($state; kubectl -n $NS logs job/$JOB):" \
       "pods started from now on copy the old file" >&2
  exit 1
fi
# pods created while the rollout ran copied the old source: once ready, give them the file
LATE=()
NOW=$(pods)
for pod in $NOW; do
  [[ " ${DONE[*]} " == *" $pod "* ]] && continue
  echo "== $pod (started during the rollout)"
  kubectl -n "$NS" wait --for=condition=Ready "pod/$pod" --timeout=900s && reload "$pod" --directions "$FILE" \
    || LATE+=("$pod")
done
if ((${#LATE[@]})); then
  echo "promoted, but ${LATE[*]} did not take $FILE: they serve the old file (look at their logs)" >&2
  exit 1
fi
echo "all pods serve $FILE for $MODEL; promoted into the source repository"
