"""The search's population evaluation on the trainer's mesh (elastic_jax/search/placement.py).

Acceptance: the search's population losses on 8 fake CPU devices (mesh fsdp=4, tensor=2) equal
one device's to 1e-5, whatever the chunk of archs and the micro-batches the logits bound
forces; both equal each arch evaluated alone by `evaluation.evaluate` (no mesh, no chunking);
a mesh that does not divide the validation batch, and a bound below one sequence's logits, are
one clear line.
"""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import REPO, xla_flags_with_devices

from elastic_jax import evaluation
from elastic_jax.errors import UserError
from elastic_jax.search import placement

# Run both in this process (1 device) and in a subprocess with 8 fake devices: the quickstart
# tiny supernet (randomised), 2 synthetic validation batches of 8 x 13 tokens, 11 archs.
SCRIPT = r'''
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
from elastic_jax.errors import UserError
from elastic_jax.search import config as search_cfg, program
from elastic_jax.workdir import build_space, init_supernet
from conftest import load_config, randomize

def setup(rows=8):
  cfg = load_config('quickstart', 'tiny')
  space = build_space(cfg)
  model = randomize(init_supernet(cfg, space), seed=3, scale=0.1)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):
    tokens = rng.integers(0, cfg.model.vocab_size, (rows, 14)).astype(np.int32)
    weights = (rng.random((rows, 13)) < 0.8).astype(np.float32)
    batches.append({'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': weights,
                    'positions': np.tile(np.arange(13, dtype=np.int32), (rows, 1)),
                    'segment_ids': np.ones((rows, 13), np.int32)})
  genomes = np.asarray(space.random_genomes(jax.random.key(5), 11), np.int32)
  return cfg, space, model, batches, genomes

def losses(mesh_cfg, chunk, max_logits_mib, rows=8):
  cfg, space, model, batches, genomes = setup(rows)
  cfg.mesh.update(mesh_cfg)
  sc = search_cfg.search_config({'search': {'chunk': chunk, 'max_logits_mib': max_logits_mib}})
  mesh = program.placement.search_mesh(cfg)
  prog = program.fitness_on_mesh(sc, space, mesh, ('loss',), model=model, batches=batches)
  fit = prog.fitness
  # The call the compiled search loop makes: fn(genomes, data, active) inside a jit.
  active = np.ones(len(genomes), bool)
  call = jax.jit(fit.fn)
  out = call(jnp.asarray(genomes), fit.data, jnp.asarray(active))
  # The most rows of any per-device [..., rows, 13, features] array of the compiled call: each
  # device should hold only its own rows (FSDP-split parameters gathered, not the batch).
  text = call.lower(jnp.asarray(genomes), fit.data, jnp.asarray(active)).compile().as_text()
  device_rows = max(int(r) for r in re.findall(r'[\[,](\d+),13,\d+\]', text))
  state_axes = {str(a) for x in jax.tree.leaves(fit.data['state']) for a in x.sharding.spec if a}
  return {'loss': np.asarray(jax.device_get(out))[:, 0].tolist(),
          'chunk': prog.plan.chunk, 'micro_batches': prog.plan.micro_batches,
          'devices': jax.device_count(), 'state_axes': sorted(state_axes),
          'device_rows': device_rows,
          'batch_spec': [list(a) if isinstance(a, tuple) else a
                         for a in fit.data['batches']['tokens'].sharding.spec]}

def proxies(mesh_cfg):
  """Zero-cost proxy objectives (a forward one, a gradient one) of the population."""
  from elastic_jax.search import proxy_objective
  cfg, space, model, batches, genomes = setup()
  cfg.mesh.update(mesh_cfg)
  names = ('vpca', 'grad_norm')
  proxy_objective.register_proxies(names, {'num_batches': 2})
  mesh = program.placement.search_mesh(cfg)
  fit = program.fitness_on_mesh(search_cfg.search_config({}), space, mesh, names, model=model,
                                batches=batches).fitness
  active = jnp.ones(len(genomes), bool)
  call = jax.jit(fit.fn)
  out = call(jnp.asarray(genomes), fit.data, active)
  text = call.lower(jnp.asarray(genomes), fit.data, active).compile().as_text()
  extra = jax.tree.leaves(fit.data['extra'])
  return {'values': np.asarray(jax.device_get(out)).tolist(),
          'device_rows': max(int(r) for r in re.findall(r'[\[,](\d+),13,\d+\]', text)),
          'extra_specs': sorted({str(x.sharding.spec) for x in extra})}

if __name__ == '__main__':
  mesh_cfg = json.loads(sys.argv[1])
  out = {'runs': [losses(mesh_cfg, c, m) for c, m in json.loads(sys.argv[2])]}
  out['proxies'] = proxies(mesh_cfg)
  try:
    losses(mesh_cfg, 1, 1024.0, rows=6)
  except UserError as e:
    out['error'] = str(e)
  print(json.dumps(out))
'''

PLANS = [(1, 1024.0), (0, 1.0), (1, 13 * 1024 * 4 / 2 ** 20)]  # default, vmapped, micro-batched


def _module():
  mod = types.ModuleType('sharded_script')
  exec(compile(SCRIPT, 'sharded_script', 'exec'), mod.__dict__)  # noqa: S102
  return mod


@pytest.mark.slow
def test_population_losses_on_8_devices_fsdp4_tensor2_equal_one_device(tmp_path, monkeypatch):
  from elastic_jax.search import objectives
  # The proxies this test registers (with its own proxy settings) stay in this test.
  monkeypatch.setattr(objectives, 'OBJECTIVES', dict(objectives.OBJECTIVES))
  script = tmp_path / 'sharded_script.py'
  script.write_text(SCRIPT)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',  # the script imports conftest as the tests do
         'PYTHONPATH': os.pathsep.join([str(REPO / 'tests'), str(REPO)]),
         'XLA_FLAGS': xla_flags_with_devices(8)}
  r = subprocess.run([sys.executable, str(script), json.dumps({'data': 1, 'fsdp': 4,
                                                               'tensor': 2}),
                      json.dumps(PLANS)], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  sharded = json.loads(r.stdout.strip().splitlines()[-1])

  mod = _module()
  single = [mod.losses({'data': -1, 'fsdp': 1, 'tensor': 1}, c, m) for c, m in PLANS]
  # Independent of the population path: each arch alone, unsharded, whole batches.
  _, space, model, batches, genomes = mod.setup()
  alone = [evaluation.evaluate(model, batches, space.decode(g))['loss'] for g in genomes]

  runs = sharded['runs']
  assert all(run['devices'] == 8 for run in runs)
  # The supernet lies as in training (FSDP and tensor axes), the rows over the batch axes.
  assert runs[0]['state_axes'] == ['fsdp', 'tensor']
  assert runs[0]['batch_spec'] == [None, ['data', 'fsdp']]
  # Every device computes its own 2 rows (1 per micro-batch when micro-batched), never the
  # whole batch's 8: without `parallel.gathered` XLA all-gathered the rows instead of the
  # FSDP-split parameters and every device computed partial sums of all 8 rows.
  assert [run['device_rows'] for run in runs] == [2, 2, 1]
  # The plans the bound makes (per device: 2 rows of 13 x 1024 float32 logits = 104 KiB):
  # chunk 0 under 1 MiB -> 9 archs at once; a bound of one row -> 2 micro-batches.
  assert [(run['chunk'], run['micro_batches']) for run in runs] == [(1, 1), (9, 1), (1, 2)]
  assert [(run['chunk'], run['micro_batches']) for run in single] == [(1, 1), (2, 1), (1, 8)]
  for run in runs + single:
    np.testing.assert_allclose(run['loss'], single[0]['loss'], rtol=1e-5)
  np.testing.assert_allclose(single[0]['loss'], alone, rtol=1e-5)
  assert len(set(np.round(alone, 4))) > 5  # the archs differ: the comparison can fail
  # Zero-cost proxy objectives (search.objectives = wpca, ...): the same values on 8 devices as
  # on 1; their minibatches lie over the batch axes as the validation rows do, and each device
  # runs its own 2 rows (before: replicated minibatches, and every device ran all 8 rows).
  proxies, one = sharded['proxies'], mod.proxies({'data': -1, 'fsdp': 1, 'tensor': 1})
  np.testing.assert_allclose(proxies['values'], one['values'], rtol=1e-4)
  assert [len(set(np.round(v, 3))) for v in np.transpose(one['values'])] >= [3, 8], one
  assert proxies['extra_specs'] == ["P(None, ('data', 'fsdp'))"], proxies
  assert proxies['device_rows'] == 2 and one['device_rows'] == 8, (proxies, one)
  assert sharded['error'] == (
      'the validation batch has 6 rows (data.batch_size) but the mesh splits batches 4 ways '
      '(mesh.data=1 x mesh.fsdp=4); make data.batch_size a multiple of 4 or change mesh.data / '
      'mesh.fsdp')

  # The command says it in one line, before it loads or writes anything.
  r = subprocess.run([sys.executable, '-m', 'elastic_jax.cli', 'search',
                      f'--config={REPO}/configs/quickstart.py:tiny', '--config.mesh.data=1',
                      '--config.mesh.fsdp=4', '--config.mesh.tensor=2',
                      '--config.data.batch_size=6', f'--workdir={tmp_path / "w"}'],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and not r.stdout
  lines = [l for l in r.stderr.splitlines() if l.startswith('elastic-jax')]
  assert lines == ['elastic-jax search: error: the validation batch has 6 rows (data.batch_size) '
                   'but the mesh splits batches 4 ways (mesh.data=1 x mesh.fsdp=4); make '
                   'data.batch_size a multiple of 4 or change mesh.data / mesh.fsdp'], r.stderr
  assert not (tmp_path / 'w').exists()


def test_a_logits_bound_below_one_sequence_stops_search_and_run_before_any_work(tmp_path,
                                                                               capsys):
  from elastic_jax import cli
  for command in ('search', 'run'):
    code = cli.main(['elastic-jax', command, f'--config={REPO}/configs/quickstart.py:tiny',
                     '--config.search.max_logits_mib=0.01', f'--workdir={tmp_path / "w"}'])
    out, err = capsys.readouterr()
    assert code == 2 and not out
    lines = [l for l in err.splitlines() if l.startswith('elastic-jax')]
    assert lines == [f'elastic-jax {command}: error: search.max_logits_mib=0.01 is below the '
                     'float32 logits of one sequence (32 tokens x 1024 vocabulary = 0.12 MiB); '
                     'raise search.max_logits_mib to at least 1'], err
    assert not (tmp_path / 'w').exists()  # nothing trained, nothing written


def _mesh(data, fsdp, tensor):
  return types.SimpleNamespace(shape={'data': data, 'fsdp': fsdp, 'tensor': tensor})


def test_eval_plan_keeps_logits_under_the_bound():
  per_row = 512 * 50304 * 4  # GPT-2-medium: one 512-token row's float32 logits
  # v5e:4x4, pure FSDP: 128 rows -> 8 per device; 1 GiB holds 10 rows: one arch, whole batch.
  plan = placement.eval_plan(1, 1024, 128, 512, 50304, _mesh(1, 16, 1))
  assert (plan.chunk, plan.micro_batches, plan.rows_per_device) == (1, 1, 8)
  assert plan.logits_bytes == 8 * per_row <= plan.bound_bytes
  # 256 MiB: 2 rows fit -> 4 micro-batches of 2 rows per device.
  plan = placement.eval_plan(4, 256, 128, 512, 50304, _mesh(1, 16, 1))
  assert (plan.chunk, plan.micro_batches, plan.rows_per_device) == (1, 4, 2)
  # One device: 8 x 32 x 1024 logits = 1 MiB per arch; chunk 0 under 5 MiB -> 5 archs.
  plan = placement.eval_plan(0, 5, 8, 32, 1024, _mesh(1, 1, 1))
  assert (plan.chunk, plan.micro_batches, plan.logits_bytes) == (5, 1, 5 << 20)
  # Micro-batches are whole divisors of the rows per device: 6 rows, 2.5 rows fit -> 3 of 2.
  plan = placement.eval_plan(1, 2.5 * 128 * 1024 * 4 / 2 ** 20, 12, 128, 1024, _mesh(2, 1, 4))
  assert (plan.micro_batches, plan.rows_per_device) == (3, 2)


def test_a_masked_lm_plan_counts_the_named_positions_only():
  """Batches naming their predicted positions (data.mlm_max_predictions) form logits there
  only, so the bound holds more archs at once: 3 of 13 positions per row here."""
  from elastic_jax.search import config as search_cfg
  from elastic_jax.search import program
  mod = _module()
  _, space, model, batches, _ = mod.setup()
  sc = search_cfg.search_config({'search': {'chunk': 0, 'max_logits_mib': 8 * 13 * 1024 * 4
                                            / 2 ** 20}})
  mesh = placement.search_mesh(mod.load_config('quickstart', 'tiny'))
  whole = program.fitness_on_mesh(sc, space, mesh, ('loss',), model=model, batches=batches)
  named = [{**b, 'mlm_positions': np.tile(np.arange(3, dtype=np.int32), (8, 1))}
           for b in batches]
  few = program.fitness_on_mesh(sc, space, mesh, ('loss',), model=model, batches=named)
  assert (whole.plan.chunk, few.plan.chunk) == (1, 4)  # 13 / 3 positions: 4 archs fit
  assert few.plan.logits_bytes == 4 * 8 * 3 * 1024 * 4


@pytest.mark.parametrize('args, message', [
    ((1, 1024, 10, 32, 1024, _mesh(2, 2, 2)),
     'the validation batch has 10 rows (data.batch_size) but the mesh splits batches 4 ways '
     '(mesh.data=2 x mesh.fsdp=2); make data.batch_size a multiple of 4 or change mesh.data / '
     'mesh.fsdp'),
    ((1, 0.1, 8, 512, 50304, _mesh(1, 1, 1)),
     'search.max_logits_mib=0.1 is below the float32 logits of one sequence (512 tokens x '
     '50304 vocabulary = 98.25 MiB); raise search.max_logits_mib to at least 99'),
])
def test_a_plan_that_cannot_fit_is_one_line(args, message):
  with pytest.raises(UserError) as e:
    placement.eval_plan(*args)
  assert str(e.value) == message and '\n' not in message


def test_single_device_search_mesh_is_the_config_mesh():
  from conftest import load_config
  mesh = placement.search_mesh(load_config('quickstart', 'tiny'))
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1, 'tensor': 1}
