#!/usr/bin/env bash
# dpjax on every worker of a Cloud TPU VM slice (e.g. v4-32: 4 hosts x 4 chips).
#
#   launch/tpu_vm.sh [--dry-run] [--create] [--setup] TPU_NAME ZONE CONFIG \
#       WORKDIR [extra dpjax.main flags]
#
#   --create   first create the slice (gcloud compute tpus tpu-vm create).
#   --setup    copy this checkout to every worker and pip-install it.
#   --dry-run  print the gcloud commands instead of running them.
#
# WORKDIR must be a bucket path (gs://...) that every worker can write:
# Orbax/tensorstore write the checkpoints there (each host its own shards),
# process 0 the metrics. Every worker runs the same `python -m dpjax.main
# ... --multihost`; jax.distributed.initialize() finds the other workers from
# the TPU metadata. On preemption (SIGTERM) the run checkpoints and exits 0:
# run this script again (without --create) to resume.
#
# Environment: ACCELERATOR_TYPE (v4-32), RUNTIME_VERSION
# (tpu-ubuntu2204-base), PROJECT (gcloud default), SPOT=1 (spot VMs),
# REMOTE_DIR (~/dpjax: code location on the workers), PYTHON (python3).
set -euo pipefail

DRY_RUN=0; CREATE=0; SETUP=0
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --create) CREATE=1 ;;
    --setup) SETUP=1 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 4 ]]; then
  echo "usage: $0 [--dry-run] [--create] [--setup] TPU_NAME ZONE CONFIG" \
       "WORKDIR [extra dpjax.main flags]" >&2
  exit 2
fi
TPU_NAME="$1"; ZONE="$2"; CONFIG="$3"; WORKDIR="$4"; shift 4
if [[ "${WORKDIR}" != gs://* ]]; then
  echo "WORKDIR must be a gs:// bucket path shared by all workers," \
       "got ${WORKDIR}" >&2
  exit 2
fi
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-~/dpjax}"
PYTHON="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

tpu=(gcloud compute tpus tpu-vm)
common=("--zone=${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then common+=("--project=${PROJECT}"); fi

run() {  # Prints (dry run) or runs one command.
  if [[ "${DRY_RUN}" == 1 ]]; then
    local out=() arg
    for arg in "$@"; do
      if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@,+-]*$ ]]; then out+=("${arg}")
      elif [[ "${arg}" != *"'"* ]]; then out+=("'${arg}'")
      else out+=("$(printf '%q' "${arg}")"); fi
    done
    echo "${out[*]}"
  else
    "$@"
  fi
}

if [[ "${CREATE}" == 1 ]]; then
  create=("${tpu[@]}" create "${TPU_NAME}" "${common[@]}"
          "--accelerator-type=${ACCELERATOR_TYPE}"
          "--version=${RUNTIME_VERSION}")
  if [[ "${SPOT:-0}" == 1 ]]; then create+=(--spot); fi
  run "${create[@]}"
fi

if [[ "${SETUP}" == 1 ]]; then
  tarball="$(mktemp -u -t dpjax_src.XXXXXX).tar.gz"  # local temp file
  run tar -czf "${tarball}" -C "${REPO}" --exclude=.git --exclude='*.egg-info' .
  run "${tpu[@]}" scp "${tarball}" "${TPU_NAME}:dpjax_src.tar.gz" \
    "${common[@]}" --worker=all
  setup="mkdir -p ${REMOTE_DIR}"
  setup+=" && tar -xzf ~/dpjax_src.tar.gz -C ${REMOTE_DIR}"
  setup+=" && cd ${REMOTE_DIR}"
  setup+=" && ${PYTHON} -m pip install -q -e . \"jax[tpu]\" gcsfs"
  run "${tpu[@]}" ssh "${TPU_NAME}" "${common[@]}" --worker=all --command \
    "${setup}"
fi

train="cd ${REMOTE_DIR} && ${PYTHON} -m dpjax.main"
train+=" --config=$(printf '%q' "${CONFIG}")"
train+=" --workdir=$(printf '%q' "${WORKDIR}") --multihost"
for arg in "$@"; do train+=" $(printf '%q' "${arg}")"; done
run "${tpu[@]}" ssh "${TPU_NAME}" "${common[@]}" --worker=all --command \
  "${train}"
