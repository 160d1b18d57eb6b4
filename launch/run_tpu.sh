#!/usr/bin/env bash
# Per-host setup and run on a TPU VM: every host of a slice runs this same script.
#
#   launch/run_tpu.sh [--venv=DIR] [--logdir=DIR] [--setup-only] [--no-setup] [--detach]
#       [--dry-run] [-- COMMAND [elastic-jax flags...]]
#
# Setup (idempotent): a virtual environment (default ~/elastic_jax_venv) with this checkout
# installed with the tpu extra (jax + libtpu). Run: `elastic-jax COMMAND ...` with its output in
# DIR/<hostname>.log (default ~/elastic_jax_logs); --detach starts it with nohup and returns.
# JAX joins the hosts of the slice by itself (elastic_jax.distributed.initialize detects the
# Cloud TPU VM); process 0 logs metrics and writes workdir files, every host writes its own shards
# of each checkpoint, so the workdir must be shared by all hosts (a gcsfuse or NFS mount).
# Usually started on all hosts at once by launch/tpu_vm.sh run, or by SkyPilot (sky_tpu.yaml).
set -euo pipefail

cd "$(dirname "$0")/.."
venv="$HOME/elastic_jax_venv"
logdir="$HOME/elastic_jax_logs"
setup=1
run=1
detach=0
dry_run=0
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv=*) venv="${1#*=}" ;;
    --logdir=*) logdir="${1#*=}" ;;
    --setup-only) run=0 ;;
    --no-setup) setup=0 ;;
    --detach) detach=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "run_tpu.sh: unknown option $1 (put elastic-jax arguments after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $run -eq 1 && $# -eq 0 ]]; then
  echo "run_tpu.sh: give the elastic-jax command after -- (or --setup-only)" >&2
  exit 2
fi

# Prints each command; runs it unless --dry-run.
do_cmd() {
  echo "+ $*"
  if [[ $dry_run -eq 0 ]]; then
    bash -c "$*"
  fi
}

if [[ $setup -eq 1 ]]; then
  do_cmd "test -x $venv/bin/python || python3 -m venv $venv"
  do_cmd "$venv/bin/pip install -q --upgrade pip"
  do_cmd "$venv/bin/pip install -q -e '.[tpu]'"
fi

if [[ $run -eq 1 ]]; then
  host="$(hostname)"
  args="$(printf '%q ' "$@")"  # shell-quoted, ends with a space
  do_cmd "mkdir -p $logdir"
  if [[ $detach -eq 1 ]]; then
    do_cmd "nohup $venv/bin/elastic-jax ${args}> $logdir/$host.log 2>&1 < /dev/null &"
  else
    do_cmd "set -o pipefail; $venv/bin/elastic-jax ${args}2>&1 | tee $logdir/$host.log"
  fi
fi
