#!/usr/bin/env bash
# N local CPU processes of one multi-process JAX run: the code path of a TPU pod, on one machine.
#
#   launch/local_multiprocess.sh [--processes=2] [--devices=4] [--port=PORT] [--logdir=DIR]
#       [--python=python3] [--dry-run] -- COMMAND [elastic-jax flags...]
#
# Each process i runs `python -m elastic_jax.cli COMMAND ...` with JAX_PLATFORMS=cpu, N fake CPU
# devices (--xla_force_host_platform_device_count=N appended to the caller's XLA_FLAGS, replacing a
# device count there; other flags are kept), and JAX_COORDINATOR_ADDRESS=
# 127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i, which `elastic_jax.distributed.initialize`
# reads. Output of process i goes to DIR/process_i.out and .err; process 0's stdout is printed at
# the end. If a process fails, the others are stopped and its stderr tail is shown; the exit code
# is the first failure's. Example (2 processes x 4 devices = one 8-device mesh):
#   launch/local_multiprocess.sh --processes=2 --devices=4 -- train \
#       --config=configs/quickstart.py:tiny --workdir=/tmp/ej_mp --config.data.batch_size=8
set -euo pipefail

processes=2
devices=4
port=""
logdir=""
python="${PYTHON:-python3}"
dry_run=0
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes=*) processes="${1#*=}" ;;
    --devices=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --logdir=*) logdir="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local_multiprocess.sh: unknown option $1 (put elastic-jax arguments after --)" >&2
       exit 2 ;;
  esac
  shift
done
if [[ $# -eq 0 ]]; then
  echo "local_multiprocess.sh: give the elastic-jax command after --, e.g. -- train --config=..." >&2
  exit 2
fi
if ! [[ "$processes" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_multiprocess.sh: --processes and --devices must be positive integers" >&2
  exit 2
fi
if [[ -z "$port" ]]; then
  if [[ $dry_run -eq 1 ]]; then
    port=PORT
  else
    port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi
logdir="${logdir:-${TMPDIR:-/tmp}/elastic_jax_mp_$$}"
# The caller's XLA flags (an optimisation level, dumps...) with this run's device count.
xla_flags="$(sed -E 's/(^| )--xla_force_host_platform_device_count=[^ ]*//g; s/^ +//' \
  <<< "${XLA_FLAGS:-}")"
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"

commands=()
for ((i = 0; i < processes; i++)); do
  commands+=("JAX_PLATFORMS=cpu XLA_FLAGS=$(printf '%q' "$xla_flags") \
JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$processes JAX_PROCESS_ID=$i \
$python -m elastic_jax.cli $(printf '%q ' "$@")")
done

if [[ $dry_run -eq 1 ]]; then
  for ((i = 0; i < processes; i++)); do
    echo "${commands[$i]}> $logdir/process_$i.out 2> $logdir/process_$i.err &"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$logdir"
pids=()
for ((i = 0; i < processes; i++)); do
  env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" \
    JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$processes" JAX_PROCESS_ID="$i" \
    "$python" -m elastic_jax.cli "$@" > "$logdir/process_$i.out" 2> "$logdir/process_$i.err" &
  pids+=($!)
done

# Wait for all; on the first failure stop the others (they would wait for it until a timeout).
status=0
finished=()
while [[ ${#finished[@]} -lt $processes ]]; do
  for ((i = 0; i < processes; i++)); do
    [[ " ${finished[*]} " == *" $i "* ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    set +e
    wait "${pids[$i]}"
    code=$?
    set -e
    finished+=("$i")
    if [[ $code -ne 0 && $status -eq 0 ]]; then
      status=$code
      for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    fi
  done
  sleep 0.2
done

if [[ $status -ne 0 ]]; then
  for ((i = 0; i < processes; i++)); do
    if [[ -s "$logdir/process_$i.err" ]]; then
      echo "--- process $i stderr (tail) ---" >&2
      tail -n 5 "$logdir/process_$i.err" >&2
    fi
  done
  echo "local_multiprocess.sh: a process failed (exit $status); logs in $logdir" >&2
  exit "$status"
fi
cat "$logdir/process_0.out"
