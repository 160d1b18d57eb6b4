#!/usr/bin/env bash
# SkyPilot: launch elastic-jax on a TPU slice from launch/sky_tpu.yaml, follow it, tear it down.
#
#   launch/sky.sh launch --cluster=NAME [--tpu=tpu-v5litepod-16] [--runtime=VERSION]
#       [--bucket=BUCKET] [--dry-run] -- COMMAND [elastic-jax flags...]
#   launch/sky.sh logs --cluster=NAME [--dry-run]
#   launch/sky.sh down --cluster=NAME [--dry-run]
#
# launch provisions the slice (or reuses the cluster), installs, and runs `elastic-jax COMMAND`
# on every host; --dry-run prints the sky command instead of running it.
set -euo pipefail

yaml="$(cd "$(dirname "$0")" && pwd)/sky_tpu.yaml"
action="${1:-}"
[[ $# -gt 0 ]] && shift
cluster="" tpu="tpu-v5litepod-16" runtime="" bucket="" dry_run=0
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster=*) cluster="${1#*=}" ;;
    --tpu=*) tpu="${1#*=}" ;;
    --runtime=*) runtime="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "sky.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
case "$action" in
  launch|logs|down) ;;
  -h|--help|help|"") usage; exit 0 ;;
  *) echo "sky.sh: unknown action '$action' (launch, logs, down)" >&2; exit 2 ;;
esac
if [[ -z "$cluster" ]]; then
  echo "sky.sh: --cluster=NAME is required" >&2
  exit 2
fi

source "$(dirname "$0")/common.sh"  # shquote, run

case "$action" in
  launch)
    if [[ $# -eq 0 ]]; then
      echo "sky.sh: launch needs the elastic-jax command after --, e.g. -- train --config=..." >&2
      exit 2
    fi
    if [[ -z "$runtime" ]]; then
      case "$tpu" in
        tpu-v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
        tpu-v5p-*) runtime=v2-alpha-tpuv5 ;;
        tpu-v6e-*) runtime=v2-alpha-tpuv6e ;;
        tpu-v4-*) runtime=tpu-ubuntu2204-base ;;
        *) echo "sky.sh: no default --runtime for $tpu; pass --runtime" >&2; exit 2 ;;
      esac
    fi
    extra=()
    [[ -n "$bucket" ]] && extra+=(--env "BUCKET=$bucket")
    # The task file with this slice's accelerator and TPU software version filled in.
    task="${TMPDIR:-/tmp}/elastic_jax_sky_$cluster.yaml"
    echo "$(shquote sed -e "s/^  accelerators: .*/  accelerators: $tpu/" \
      -e "s/^    runtime_version: .*/    runtime_version: $runtime/" "$yaml") > $(shquote "$task")"
    if [[ $dry_run -eq 0 ]]; then
      sed -e "s/^  accelerators: .*/  accelerators: $tpu/" \
        -e "s/^    runtime_version: .*/    runtime_version: $runtime/" "$yaml" > "$task"
    fi
    run sky launch -c "$cluster" "$task" --env "ARGS=$(shquote "$@")" "${extra[@]}" --yes
    ;;
  logs) run sky logs "$cluster" ;;
  down) run sky down "$cluster" --yes ;;
esac
