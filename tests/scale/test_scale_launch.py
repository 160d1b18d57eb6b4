"""launch/*.sh --dry-run print the complete gcloud / sky / local commands they would run."""

import os
import shlex
import subprocess

import pytest
from conftest import REPO

TRAIN = ['train', '--config=configs/gpt2_medium_supernet.py', '--workdir=/mnt/shared/gpt2',
         "--config.train.eval_archs=('largest',)"]


def dry_run(script, *args, env=None):
  r = subprocess.run(['bash', f'launch/{script}', *args, '--dry-run'] if '--' not in args else
                     ['bash', f'launch/{script}', *args[:args.index('--')], '--dry-run',
                      *args[args.index('--'):]],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  return [shlex.split(l) for l in r.stdout.strip().splitlines()]


def test_tpu_vm_up_creates_copies_and_installs_on_every_worker():
  cmds = dry_run('tpu_vm.sh', 'up', '--name=ej', '--zone=us-west4-a', '--project=p',
                 '--type=v5litepod-16', '--spot')
  assert cmds[0] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ej', '--zone=us-west4-a',
                     '--project=p', '--accelerator-type=v5litepod-16',
                     '--version=v2-alpha-tpuv5-lite', '--spot']
  assert cmds[1][0] == 'tar' and str(REPO) in cmds[1]
  scp, unpack, setup = cmds[2], cmds[3], cmds[4]
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert unpack[4] == 'ssh' and '--worker=all' in unpack
  assert 'tar -xzf' in unpack[-1]
  assert setup[-1] == '--command=bash ~/elastic_jax/launch/run_tpu.sh --setup-only'


def test_tpu_vm_run_runs_the_same_command_on_all_workers():
  cmds = dry_run('tpu_vm.sh', 'run', '--name=ej', '--zone=us-west4-a', '--detach', '--', *TRAIN)
  (ssh,) = cmds
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'ej']
  assert '--worker=all' in ssh
  remote = shlex.split(ssh[-1].removeprefix('--command='))
  assert remote[:5] == ['bash', '~/elastic_jax/launch/run_tpu.sh', '--no-setup', '--detach', '--']
  assert remote[5:] == TRAIN  # arguments survive both shells


def test_tpu_vm_logs_and_delete():
  (mkdir, scp), = [dry_run('tpu_vm.sh', 'logs', '--name=ej', '--zone=z')]
  assert mkdir == ['mkdir', '-p', 'logs/ej']
  assert scp[4:7] == ['scp', '--recurse', 'ej:elastic_jax_logs'] and '--worker=all' in scp
  (delete,) = dry_run('tpu_vm.sh', 'delete', '--name=ej', '--zone=z')
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'ej', '--zone=z', '--quiet']


def test_run_tpu_installs_the_tpu_extra_then_runs():
  r = subprocess.run(['bash', 'launch/run_tpu.sh', '--dry-run', '--venv=/v', '--logdir=/l', '--',
                      *TRAIN], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert any("pip install -q -e '.[tpu]'" in l for l in lines)
  run = shlex.split(lines[-1].removeprefix('+ ').split(' 2>&1')[0].removeprefix(
      'set -o pipefail; '))
  assert run == ['/v/bin/elastic-jax', *TRAIN]


def test_sky_launch_fills_the_task_file_and_passes_the_command():
  sed, launch = dry_run('sky.sh', 'launch', '--cluster=ej', '--tpu=tpu-v5p-16', '--bucket=b',
                        '--', *TRAIN)
  assert sed[0] == 'sed' and 'accelerators: tpu-v5p-16' in sed[2]
  assert 'runtime_version: v2-alpha-tpuv5' in sed[4]
  assert launch[:4] == ['sky', 'launch', '-c', 'ej'] and launch[4] == sed[-1]
  args = launch[launch.index('--env') + 1]
  assert args.startswith('ARGS=') and shlex.split(args[5:]) == TRAIN
  assert (REPO / 'launch' / 'sky_tpu.yaml').is_file()
  assert dry_run('sky.sh', 'down', '--cluster=ej') == [['sky', 'down', 'ej', '--yes']]


def test_local_multiprocess_dry_run_starts_one_process_per_id():
  # The caller's XLA flags are kept, its device count replaced by the run's.
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8 '
                                    '--xla_backend_optimization_level=0'}
  cmds = dry_run('local_multiprocess.sh', '--processes=3', '--devices=2', '--port=1234',
                 '--logdir=/tmp/l', '--python=py', '--', *TRAIN, env=env)
  assert cmds[-1] == ['wait']
  flags = '--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2'
  for i, cmd in enumerate(cmds[:-1]):
    assert cmd[:6] == ['JAX_PLATFORMS=cpu', f'XLA_FLAGS={flags}',
                       'JAX_COORDINATOR_ADDRESS=127.0.0.1:1234', 'JAX_NUM_PROCESSES=3',
                       f'JAX_PROCESS_ID={i}', 'py']
    assert cmd[6:9] == ['-m', 'elastic_jax.cli', 'train'] and cmd[9:12] == TRAIN[1:]
    assert cmd[12:] == ['>', f'/tmp/l/process_{i}.out', '2>', f'/tmp/l/process_{i}.err', '&']


@pytest.mark.parametrize('script, args', [
    ('tpu_vm.sh', ['explode', '--name=a', '--zone=b']),
    ('tpu_vm.sh', ['create', '--zone=b']),
    ('tpu_vm.sh', ['create', '--name=a', '--zone=b']),
    ('sky.sh', ['launch', '--cluster=c']),
    ('local_multiprocess.sh', ['--processes=0', '--', 'train']),
])
def test_bad_arguments_fail_with_one_line(script, args):
  r = subprocess.run(['bash', f'launch/{script}', *args, '--dry-run'], cwd=REPO,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
