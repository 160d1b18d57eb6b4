"""Multi-process JAX on one machine: 2 processes x 4 CPU devices == 1 process x 8 devices.

The processes are started by launch/local_multiprocess.sh (the same path as a TPU pod: every
process runs `elastic-jax train`, joined by `elastic_jax.distributed.initialize`, gloo collectives
between processes).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, load_config, xla_flags_with_devices
from flax import nnx

from elastic_jax import distributed
from elastic_jax.errors import UserError

TRAIN_ARGS = ['--config=configs/quickstart.py:tiny', '--config.train.steps=5',
              '--config.train.log_every=1', '--config.train.checkpoint_every=5',
              '--config.data.batch_size=8', '--config.data.num_shards=2',
              '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2',
              "--config.train.eval_archs=('largest',)"]


def losses(workdir) -> dict[int, float]:
  out = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    d = json.loads(line)
    if 'loss' in d:
      assert d['step'] not in out, 'a step was logged twice (only process 0 may log)'
      out[d['step']] = d['loss']
  return out


def restored_params(workdir):
  from elastic_jax.checkpoints import restore_params_if_any
  from elastic_jax.workdir import init_supernet
  model = init_supernet(load_config('quickstart', 'tiny'))
  step = restore_params_if_any(workdir, model)
  return step, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture
def built_data(data_cache):
  """Builds the tiny config's dataset and tokenizer once, before processes share the cache."""
  from elastic_jax import data
  cfg = load_config('quickstart', 'tiny')
  cfg.data.cache_dir = str(data_cache)
  next(data.train_iterator(cfg.data))
  return data_cache


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(built_data, tmp_path):
  cache = f'--config.data.cache_dir={built_data}'
  two, one = tmp_path / 'two', tmp_path / 'one'
  r = subprocess.run(['bash', 'launch/local_multiprocess.sh', '--processes=2', '--devices=4',
                      f'--logdir={tmp_path / "logs"}', f'--python={sys.executable}', '--',
                      'train', *TRAIN_ARGS, cache, f'--workdir={two}'],
                     cwd=REPO, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads([l for l in r.stdout.splitlines() if l.startswith('{')][-1])
  assert result['step'] == 5
  # The log line goes to process 0's stderr (stdout holds the result alone).
  assert ("mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 2 process(es)"
          in (tmp_path / 'logs' / 'process_0.err').read_text())
  # Only process 0 prints its result.
  assert not [l for l in (tmp_path / 'logs' / 'process_1.out').read_text().splitlines()
              if l.startswith('{')]

  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags_with_devices(8)}
  r = subprocess.run([sys.executable, '-m', 'elastic_jax.cli', 'train', *TRAIN_ARGS, cache,
                      f'--workdir={one}'], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]

  a, b = losses(two), losses(one)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
  for step in a:
    assert a[step] == pytest.approx(b[step], rel=1e-5), (step, a, b)

  # The 2-process checkpoint (written cooperatively by both) restores in this 1-device process.
  step_two, params_two = restored_params(two)
  step_one, params_one = restored_params(one)
  assert step_two == step_one == 5
  for x, y in zip(params_two, params_one):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_processes_with_different_configs_stop_with_one_clear_line(tmp_path):
  port = free_port()
  procs = []
  for i, steps in enumerate((5, 6)):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
           'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)}
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'elastic_jax.cli', 'train', '--config=configs/quickstart.py:tiny',
         f'--config.train.steps={steps}', f'--workdir={tmp_path / "w"}'],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith('elastic-jax train: error: process 1 of 2 was started with a '
                           'different config: train.steps=6 (process 0: 5)'), last


def test_settings_come_from_config_then_environment(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(name, raising=False)
  cfg = load_config('quickstart', 'tiny')
  assert distributed.settings(cfg)['how'] in ('single', 'cluster')
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '3')
  monkeypatch.setenv('JAX_PROCESS_ID', '2')
  st = distributed.settings(cfg)
  assert (st['how'], st['coordinator_address'], st['num_processes'], st['process_id']) == (
      'environment', '127.0.0.1:1234', 3, 2)
  cfg.distributed = distributed.default_config()
  cfg.distributed.coordinator_address = '10.0.0.2:8476'
  cfg.distributed.num_processes = 4
  cfg.distributed.process_id = 1
  st = distributed.settings(cfg)
  assert (st['how'], st['coordinator_address'], st['num_processes'], st['process_id']) == (
      'explicit', '10.0.0.2:8476', 4, 1)


@pytest.mark.parametrize('field, value, message', [
    ('coordinator_address', 'nohost', 'must be host:port'),
    ('process_id', 4, r'process_id=4 must be in \[0, 4\)'),
])
def test_bad_distributed_settings_fail_before_connecting(field, value, message):
  cfg = load_config('quickstart', 'tiny')
  cfg.distributed = distributed.default_config()
  cfg.distributed.coordinator_address = '127.0.0.1:1234'
  cfg.distributed.num_processes = 4
  cfg.distributed.process_id = 0
  cfg.distributed[field] = value
  with pytest.raises(UserError, match=message):
    distributed.initialize(cfg)


def test_single_process_helpers_are_identities():
  assert distributed.allgather_json({'a': [1, 2]}) == [{'a': [1, 2]}]
  distributed.check_same_config(load_config('quickstart', 'tiny'), workdir='w')
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ('data', 'fsdp', 'tensor'))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  assert distributed.process_batch_shard(sharding, 8) == (0, 1)
  batch = distributed.global_batch({'tokens': np.arange(8).reshape(4, 2)}, sharding)
  np.testing.assert_array_equal(np.asarray(batch['tokens']), np.arange(8).reshape(4, 2))


def test_num_shards_makes_global_batches_independent_of_the_process_count(built_data):
  from elastic_jax import data
  cfg = load_config('quickstart', 'tiny')
  cfg.data.cache_dir = str(built_data)
  cfg.data.batch_size = 8
  cfg.data.num_shards = 4
  one = data.train_iterator(cfg.data)
  two = [data.train_iterator(cfg.data, process_index=p, process_count=2) for p in range(2)]
  for _ in range(3):
    whole = next(one)
    parts = [next(it) for it in two]
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
  # The run's data position moves between process counts: 2 processes' states -> 1 process.
  run_state = data.merge_process_states([it.get_state() for it in two])
  resumed = data.train_iterator(cfg.data)
  resumed.set_state(data.process_state(run_state, 0, 1))
  expected = next(one)
  got = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(expected[key], got[key])
  with pytest.raises(UserError, match='cannot split'):
    data.process_state(run_state, 0, 3)


RUN_ARGS = ['--config=configs/quickstart.py:tiny', '--config.train.steps=4',
            '--config.train.checkpoint_every=4', '--config.data.num_shards=2',
            "--config.train.eval_archs=('largest',)", '--config.search.generations=4',
            '--config.search.latency=False']  # measured latency would differ between runs


def _files(workdir) -> dict[str, bytes]:
  return {str(p.relative_to(workdir)): p.read_bytes()
          for sub in ('search', 'export') for p in sorted((workdir / sub).rglob('*'))
          if p.is_file()}


@pytest.mark.slow
def test_two_process_run_searches_like_one_process_and_writes_the_same_files(built_data,
                                                                            tmp_path):
  """`run` over 2 processes x 1 device (one search state, every process in each sharded
  population forward, process 0 writing) == 1 process x 2 devices: the same front, history,
  checkpoint and exported model; only the timings differ."""
  cache = f'--config.data.cache_dir={built_data}'
  two, one = tmp_path / 'two', tmp_path / 'one'
  r = subprocess.run(['bash', 'launch/local_multiprocess.sh', '--processes=2', '--devices=1',
                      f'--logdir={tmp_path / "logs"}', f'--python={sys.executable}', '--',
                      'run', *RUN_ARGS, cache, f'--workdir={two}'],
                     cwd=REPO, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  err = (tmp_path / 'logs' / 'process_0.err').read_text()
  assert ("search: population forward on mesh {'data': 2, 'fsdp': 1, 'tensor': 1} over 2 "
          'process(es)') in err, err[-2000:]
  assert 'exported front member' in r.stdout
  assert 'exported front member' not in (tmp_path / 'logs' / 'process_1.out').read_text()

  # The flags the launcher gives its processes (the test run's, with its device count): the two
  # runs must compile alike for their floats to be equal.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags_with_devices(2)}
  r = subprocess.run([sys.executable, '-m', 'elastic_jax.cli', 'run', *RUN_ARGS, cache,
                      f'--workdir={one}'], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]

  a, b = _files(two), _files(one)
  assert sorted(a) == sorted(b)
  assert {'search/pareto.json', 'search/history.jsonl', 'search/state.npz',
          'search/pareto.png', 'search/summary.md'} <= set(a)
  assert any(k.startswith('export/front_') and k.endswith('model.safetensors') for k in a)
  timing = ('search_seconds', 'archs_per_second')
  pa, pb = (json.loads(x['search/pareto.json']) for x in (a, b))
  assert {k: v for k, v in pa.items() if k not in timing} == \
      {k: v for k, v in pb.items() if k not in timing}
  assert len(pa['front']) >= 3 and pa['n_evals'] > pa['pop_size']
  rows = lambda x: [{k: v for k, v in json.loads(l).items() if k != 'seconds'}
                    for l in x['search/history.jsonl'].splitlines()]
  assert rows(a) == rows(b) and len(rows(a)) == 4
  for name in a:
    if name.startswith('export/'):
      assert a[name] == b[name], name  # the exported model and its files, byte for byte
  with np.load(two / 'search' / 'state.npz') as za, np.load(one / 'search' / 'state.npz') as zb:
    for k in za.files:
      if k != 'history_seconds':
        np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
