#!/usr/bin/env bash
# A TPU VM or pod slice with gcloud: create, copy the code to every worker, install, run the same
# command on all workers, fetch logs, delete.
#
#   launch/tpu_vm.sh ACTION --name=NAME --zone=ZONE [--project=P] [options] [--dry-run] [-- ARGS]
#
# Actions:
#   create  --type=ACCELERATOR_TYPE [--version=RUNTIME] [--spot]   e.g. --type=v5litepod-16
#   copy    tar this checkout, scp it to every worker, unpack into ~/elastic_jax
#   setup   on every worker: launch/run_tpu.sh --setup-only (venv + pip install -e '.[tpu]')
#   up      create, copy, setup
#   run     on every worker at once: launch/run_tpu.sh -- ARGS (e.g. -- train --config=...);
#           --detach returns at once (follow with `logs`)
#   logs    fetch ~/elastic_jax_logs of every worker into ./logs/NAME/
#   delete  delete the TPU VM
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
action="${1:-}"
[[ $# -gt 0 ]] && shift
name="" zone="" project="" type="" version="" spot=0 detach=0 dry_run=0
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --type=*) type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) spot=1 ;;
    --detach) detach=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

case "$action" in
  create|copy|setup|up|run|logs|delete) ;;
  -h|--help|help|"") usage; exit 0 ;;
  *) echo "tpu_vm.sh: unknown action '$action' (create, copy, setup, up, run, logs, delete)" >&2
     exit 2 ;;
esac
if [[ -z "$name" || -z "$zone" ]]; then
  echo "tpu_vm.sh: --name=NAME and --zone=ZONE are required" >&2
  exit 2
fi
if [[ "$action" == run && $# -eq 0 ]]; then
  echo "tpu_vm.sh: run needs the elastic-jax command after --, e.g. -- train --config=..." >&2
  exit 2
fi

# The TPU software version by generation, unless --version is given.
runtime_for() {
  case "$1" in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "tpu_vm.sh: no default --version for accelerator type '$1'; pass --version" >&2
       return 2 ;;
  esac
}

where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

source "$(dirname "$0")/common.sh"  # shquote, run

tpu=(gcloud compute tpus tpu-vm)
archive="${TMPDIR:-/tmp}/elastic_jax_code.tar.gz"

do_create() {
  if [[ -z "$type" ]]; then
    echo "tpu_vm.sh: create needs --type=ACCELERATOR_TYPE (e.g. v5litepod-16, v5p-16)" >&2
    exit 2
  fi
  [[ -n "$version" ]] || version="$(runtime_for "$type")"
  local extra=()
  [[ $spot -eq 1 ]] && extra+=(--spot)
  run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version" \
    "${extra[@]}"
}

do_copy() {
  run tar -czf "$archive" --exclude=./.git --exclude=./workdirs --exclude=./logs \
    --exclude='*/__pycache__' --exclude='*.egg-info' -C "$repo" .
  run "${tpu[@]}" scp "$archive" "$name":elastic_jax_code.tar.gz "${where[@]}" --worker=all
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
    --command="mkdir -p ~/elastic_jax && tar -xzf ~/elastic_jax_code.tar.gz -C ~/elastic_jax"
}

do_setup() {
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
    --command="bash ~/elastic_jax/launch/run_tpu.sh --setup-only"
}

do_run() {
  local flags="--no-setup"
  [[ $detach -eq 1 ]] && flags+=" --detach"
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
    --command="bash ~/elastic_jax/launch/run_tpu.sh $flags -- $(shquote "$@")"
}

do_logs() {
  run mkdir -p "logs/$name"
  run "${tpu[@]}" scp --recurse "$name":elastic_jax_logs "logs/$name/" "${where[@]}" --worker=all
}

do_delete() {
  run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
}

case "$action" in
  create) do_create ;;
  copy) do_copy ;;
  setup) do_setup ;;
  up) do_create; do_copy; do_setup ;;
  run) do_run "$@" ;;
  logs) do_logs ;;
  delete) do_delete ;;
esac
