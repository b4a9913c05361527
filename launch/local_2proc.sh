#!/usr/bin/env bash
# Multi-process dpjax on ONE machine (CPU, gloo collectives): the smallest
# faithful copy of a pod run, for tests and for debugging multi-host code.
#
#   launch/local_2proc.sh [--dry-run] CONFIG WORKDIR [extra dpjax.main flags]
#
# Starts NUM_PROCESSES (default 2) copies of `python -m dpjax.main`, each with
# DEVICES_PER_PROCESS (default 4) simulated CPU devices, coordinated over
# localhost:PORT (default 12355). Exits non-zero if any process fails.
# Environment: PYTHON (default: python), NUM_PROCESSES, DEVICES_PER_PROCESS,
# PORT, LOG_DIR (default: WORKDIR/logs; one log per process).
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [extra dpjax.main flags]" >&2
  exit 2
fi
CONFIG="$1"; WORKDIR="$2"; shift 2
PYTHON="${PYTHON:-python}"
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-12355}"
LOG_DIR="${LOG_DIR:-${WORKDIR}/logs}"

command_for() {  # $1 = process id
  printf 'JAX_PLATFORMS=cpu XLA_FLAGS=%s' \
    "--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
  printf ' %q -m dpjax.main --config=%q --workdir=%q' \
    "${PYTHON}" "${CONFIG}" "${WORKDIR}"
  printf ' --coordinator_address=localhost:%s' "${PORT}"
  printf ' --num_processes=%s --process_id=%s' "${NUM_PROCESSES}" "$1"
}

extra=()
for arg in "$@"; do extra+=("$(printf '%q' "${arg}")"); done

if [[ "${DRY_RUN}" == 1 ]]; then
  for ((p = 0; p < NUM_PROCESSES; p++)); do
    log="${LOG_DIR}/process_${p}.log"
    echo "$(command_for "$p") ${extra[*]:-} > ${log} 2>&1 &"
  done
  echo "wait"
  exit 0
fi

mkdir -p "${LOG_DIR}"
pids=()
for ((p = 0; p < NUM_PROCESSES; p++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
    "${PYTHON}" -m dpjax.main --config="${CONFIG}" --workdir="${WORKDIR}" \
    --coordinator_address="localhost:${PORT}" \
    --num_processes="${NUM_PROCESSES}" --process_id="${p}" "$@" \
    > "${LOG_DIR}/process_${p}.log" 2>&1 &
  pids+=("$!")
done
# SIGTERM to this script is forwarded to every process (preemption drill).
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
status=0
for p in "${!pids[@]}"; do
  while true; do
    rc=0
    wait "${pids[$p]}" || rc=$?
    # > 128: `wait` was interrupted by the trap; the process still runs.
    if (( rc > 128 )) && kill -0 "${pids[$p]}" 2>/dev/null; then continue; fi
    break
  done
  if (( rc != 0 )); then
    echo "process ${p} exited ${rc}; see ${LOG_DIR}/process_${p}.log" >&2
    status=1
  fi
done
exit "${status}"
