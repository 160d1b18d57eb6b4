"""`elastic-jax compile`: lower and compile for a TPU slice on this CPU (needs the tpu extra)."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_config

from elastic_jax import aot, cli
from elastic_jax.errors import UserError

QUICK = f'--config={REPO}/configs/quickstart.py:tiny'


def run(capsys, *args):
  code = cli.main(['elastic-jax', *args])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize('topology', ['v9:2x2', 'v5e:2x2x2', 'v5p:4x4', 'v5e', 'v5e:0x2'])
def test_unknown_topology_is_one_clear_line(capsys, topology):
  code, out, err = run(capsys, 'compile', QUICK, f'--topology={topology}')
  assert code == 2 and not out
  lines = [l for l in err.splitlines() if l.startswith('elastic-jax')]
  assert len(lines) == 1 and 'unknown topology' in lines[0], err
  assert 'v5e:4x4' in lines[0]  # says what to write


def test_a_slice_libtpu_cannot_describe_says_why(capsys):
  """v5e:3x3 parses but no v5e pod has it (a host's 2x2 chips do not divide it): libtpu's reason,
  not 'install the tpu extra' (it is installed)."""
  pytest.importorskip('libtpu')
  code, out, err = run(capsys, 'compile', QUICK, '--topology=v5e:3x3')
  lines = [l for l in err.splitlines() if l.startswith('elastic-jax')]
  assert code == 2 and not out and len(lines) == 1, err
  assert "TPU topology 'v5e:3x3' is not available" in lines[0] and 'divisible' in lines[0]
  assert 'tpu extra' not in lines[0]


def test_topology_names_parse():
  assert aot.parse_topology('v5e:4x4') == ('v5e', (4, 4))
  assert aot.parse_topology('V5P:2x2x2') == ('v5p', (2, 2, 2))
  with pytest.raises(UserError, match='unknown topology'):
    aot.parse_topology('tpu:2x2')


def test_mesh_that_does_not_fit_the_topology_is_one_clear_line(capsys):
  pytest.importorskip('libtpu')
  code, out, err = run(capsys, 'compile', QUICK, '--topology=v5e:2x2', '--config.mesh.data=3')
  assert code == 2 and not out
  lines = [l for l in err.splitlines() if l.startswith('elastic-jax')]
  assert len(lines) == 1, err
  assert 'does not fit topology v5e:2x2 (4 devices)' in lines[0], lines[0]


@pytest.fixture(scope='module')
def tiny_v5e_report():
  """`elastic-jax compile` of the tiny quickstart config for v5e:2x2 (every program, FLOPs by
  loop counts), compiled once for the tests of this file that read it."""
  pytest.importorskip('libtpu')
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(['elastic-jax', 'compile', QUICK, '--topology=v5e:2x2'])
  assert code == 0, err.getvalue()
  return json.loads(out.getvalue())


@pytest.mark.slow
def test_small_config_compiles_for_v5e_2x2_and_reports_memory(tiny_v5e_report):
  report = tiny_v5e_report
  assert report['devices'] == 4 and report['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert report['fits']
  for name in ('train_step', 'population_eval', 'dense_step'):
    p = report['programs'][name]
    m = p['memory_bytes']
    assert m['arguments'] > 0 and m['temporaries'] > 0 and 0 < m['total'] < p[
        'hbm_bytes_per_device']
    # Every sub-network's FLOPs are executed (at supernet widths, so at least the model FLOPs).
    assert p['xla_flops_per_device'] * report['devices'] >= 0.9 * p['model_flops']
    assert p['estimated_seconds'] > 0 and 0 < p['mfu_estimate'] < 1
  assert report['programs']['train_step']['memory_bytes']['aliased'] > 0  # donated state
  # The dense reference: XLA's count of its FLOPs against cost.py's analytic training FLOPs of the
  # exported largest model (attention softmax, norms and the optimizer are the difference).
  dense = report['programs']['dense_step']
  assert dense['memory_bytes']['aliased'] > 0
  assert 1.0 <= dense['xla_flops_per_device'] * report['devices'] / dense['model_flops'] < 1.4
  assert report['masked_over_dense'] == pytest.approx(
      dense['mfu_estimate'] / report['programs']['train_step']['mfu_estimate'])

  # The loop-count FLOPs agree with an analysis compile whose loops are unrolled. The train step's
  # and the dense step's agreement is checked by the chunked-vocabulary and micro-batch tests
  # below (their loops include this one's), so only the population evaluation is unrolled here.
  exact = aot.compile_report(load_config('quickstart', 'tiny'), 'v5e:2x2',
                             programs=('population_eval',), flops='unrolled')
  assert report['programs']['population_eval']['xla_flops_per_device'] == pytest.approx(
      exact['programs']['population_eval']['xla_flops_per_device'], rel=0.1)


@pytest.mark.slow
def test_gpt2_medium_fits_in_v5e_4x4_hbm():
  pytest.importorskip('libtpu')
  cfg = load_config('gpt2_medium_supernet')
  report = aot.compile_report(cfg, 'v5e:4x4', programs=('train_step',), flops='none')
  step = report['programs']['train_step']
  assert report['params_max'] > 340e6 and report['mesh']['fsdp'] == 16
  assert step['fits'], aot.format_report(report)
  assert step['memory_bytes']['total'] < 0.95 * step['hbm_bytes_per_device']


@pytest.mark.parametrize('name', ['gpt2_medium_supernet', 'bert_base_elm'])
@pytest.mark.parametrize('arg', [None, 'v5p-8', 'runlocal'])
def test_large_configs_build(name, arg):
  from elastic_jax.workdir import build_space
  cfg = load_config(name, arg)
  low, high = build_space(cfg).parameter_range()
  assert 0 < low < high
  if arg != 'runlocal':
    assert high > (340e6 if name.startswith('gpt2') else 80e6)
    assert cfg.model.dtype == 'bfloat16' and cfg.model.param_dtype == 'float32'
  # Every micro-batch spans all chips of the slice it was sized for (16 or 8).
  assert cfg.data.batch_size % (cfg.train.grad_accum * (8 if arg == 'v5p-8' else 16 if arg is
                                                         None else 1)) == 0


@pytest.mark.parametrize('objectives', [('loss', 'params'), ('wpca', 'params')])
def test_compile_builds_the_program_the_search_runs(objectives, monkeypatch):
  """`elastic-jax compile`'s population evaluation is the search's own loop: the same jit key
  (strategy, fitness, sizes, chunking), with shapes-only data laid out as the search lays out
  the real supernet and validation batches (and a zero-cost proxy's minibatches)."""
  import jax
  import numpy as np

  from elastic_jax.search import objectives as objectives_lib
  from elastic_jax.search import placement
  # The proxies compile registers with this config's settings (as the search does) stay here.
  monkeypatch.setattr(objectives_lib, 'OBJECTIVES', dict(objectives_lib.OBJECTIVES))
  from elastic_jax.search import program as search_program
  from elastic_jax.workdir import init_supernet

  cfg = load_config('quickstart', 'tiny')
  cfg.search.objectives = objectives
  cfg.proxy.num_batches = 1
  mesh = placement.search_mesh(cfg)
  sc, space, compiled = aot._search_program(cfg, mesh)
  rows, seq = cfg.data.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  batches = [{k: rng.integers(1, 9, (rows, seq)).astype(d)
              for k, d in aot.batch_keys(cfg).items()} for _ in range(cfg.data.eval_batches)]
  searched = search_program.build(sc, space, mesh, model=init_supernet(cfg, space),
                                  batches=batches)
  assert compiled.searcher.spec == searched.searcher.spec
  assert compiled.plan == searched.plan
  shapes = lambda data: [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(data)]
  assert shapes(compiled.fitness.data) == shapes(searched.fitness.data)
  search_program.lowered_advance(compiled)  # lowers from shapes alone


@pytest.mark.slow
def test_dense_reference_step_counts_every_micro_batch():
  """The dense reference step accumulates micro-batches in a loop whose body XLA counts once:
  'loops' multiplies it by train.grad_accum and agrees with the unrolled analysis (the optimizer
  update, counted grad_accum times by 'loops', is the difference: 5% on this tiny model, whose
  replicated Adam update is large next to its few FLOPs per token)."""
  pytest.importorskip('libtpu')
  cfg = load_config('quickstart', 'tiny')
  cfg.data.batch_size, cfg.train.grad_accum = 8, 2
  loops = aot.compile_report(cfg, 'v5e:2x2', programs=('dense_step',))
  exact = aot.compile_report(cfg, 'v5e:2x2', programs=('dense_step',), flops='unrolled')
  flops = lambda r: r['programs']['dense_step']['xla_flops_per_device']
  once = loops['programs']['dense_step']['xla_flops_loop_bodies_once']
  assert flops(exact) == pytest.approx(flops(loops), rel=0.1)
  assert flops(exact) > 1.8 * once  # both micro-batches counted
  assert loops['masked_over_dense'] is None  # no masked step compiled


@pytest.mark.slow
def test_chunked_vocabulary_losses_are_counted_in_every_chunk(tiny_v5e_report):
  """train.logits_chunk runs the losses in a loop whose body XLA counts once: the FLOP-counting
  twin unrolls it (and the students' loop in each chunk), so 'loops' agrees with the unrolled
  analysis, and the chunked step counts more FLOPs than the unchunked one (its backward pass
  recomputes every chunk's logits; counted once, the 3 chunks' FLOPs would fall well below)."""
  pytest.importorskip('libtpu')
  cfg = load_config('quickstart', 'tiny')
  plain = tiny_v5e_report
  cfg.train.logits_chunk = 12  # 32 positions: chunks of 12, 12 and 8
  loops = aot.compile_report(cfg, 'v5e:2x2', programs=('train_step',))
  exact = aot.compile_report(cfg, 'v5e:2x2', programs=('train_step',), flops='unrolled')
  flops = lambda r: r['programs']['train_step']['xla_flops_per_device']
  # The twin runs the layers, the K - 1 sub-networks and the chunks unrolled: 'loops' counts the
  # same program as the unrolled analysis (1% apart here), not the sub-network scan's body x K / 2
  # (13% above it).
  assert flops(loops) == pytest.approx(flops(exact), rel=0.03)
  assert flops(loops) > flops(plain)


def test_topology_programs_stay_out_of_the_persistent_cache(tmp_path):
  """A program compiled for a topology's description can never be loaded from the persistent
  compilation cache (JAX would warn and compile again): it is not written there, while the CPU's
  programs still are (with every compile time cached)."""
  pytest.importorskip('libtpu')
  script = '''
import jax, jax.numpy as jnp
from elastic_jax import aot
device = aot.tpu_devices('v5e:2x2')[0]
x = jax.ShapeDtypeStruct((64, 64), jnp.float32,
                         sharding=jax.sharding.SingleDeviceSharding(device))
def tpu_program(a):
  return a @ a
def cpu_program(a):
  return a @ a + 1
aot._compile(jax.jit(tpu_program), x)
jax.jit(cpu_program)(jnp.ones((64, 64))).block_until_ready()
'''
  cache = tmp_path / 'xla'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(cache),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  r = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                     cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  entries = [p.name for p in cache.iterdir() if p.name.endswith('-cache')]
  assert any(n.startswith('jit_cpu_program') for n in entries), entries
  assert not any(n.startswith('jit_tpu_program') for n in entries), entries


@pytest.mark.slow
def test_compile_builds_the_step_with_an_external_teacher(tiny_cfg, tmp_path, capsys):
  """`compile` of a config whose train.distill.teacher names an exported model or a trained
  workdir (the compress job's fine-tuning): the teacher enters as shapes, without its weights
  read, laid out as the trainer lays the loaded teacher out; the step fits, and its model FLOPs
  count the teacher's forward, which XLA's count of the compiled program covers."""
  pytest.importorskip('libtpu')
  import copy

  import jax
  from conftest import randomize
  from flax import nnx

  from elastic_jax import export, parallel
  from elastic_jax.train import trainer
  from elastic_jax.workdir import build_space, init_supernet

  cfg = tiny_cfg
  space = build_space(cfg)
  exported = tmp_path / 'teacher'
  export.save(export.export(randomize(init_supernet(cfg, space), 3, 0.05), space.cfg,
                            space.largest()), exported, arch=space.largest())
  # A teacher run with a wider FFN than this run's space: read with its own config.
  run_cfg = copy.deepcopy(cfg)
  run_cfg.space.ffn = (32, 96)
  run_cfg.train.update({'steps': 1, 'checkpoint_every': 1, 'eval_every': 0, 'log_every': 1})
  trainer.train(run_cfg, tmp_path / 'W', progress=False)
  mesh = parallel.make_mesh(cfg.mesh)
  for path, ffn in ((exported, 64), (tmp_path / 'W', 96)):
    cfg.train.distill.teacher = str(path)
    setup, (_, _, teacher_args) = aot.train_program(cfg, mesh)
    loaded = trainer.load_teacher(str(path), cfg)
    assert {l.ffn for l in loaded.dims.layers} == {ffn}
    loaded = nnx.state(loaded, nnx.Param)
    assert jax.tree.structure(teacher_args) == jax.tree.structure(loaded)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(teacher_args)] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(loaded)], path
    assert [x.sharding for x in jax.tree.leaves(teacher_args)] == jax.tree.leaves(
        setup.teacher_shardings)

  cfg.train.distill.teacher = str(exported)
  report = aot.compile_report(cfg, 'v5e:2x2', programs=('train_step',))
  step = report['programs']['train_step']
  assert step['fits'] and step['memory_bytes']['arguments'] > 0
  # The teacher is the space's largest model: its forward, costed as a dense model, is the
  # largest sub-network's forward as the space costs it.
  forward = float(aot.model_flops_per_token(cfg, space.cost(space.largest()), train=False))
  assert step['teacher_flops_per_token'] == pytest.approx(forward, rel=1e-6)
  assert step['xla_flops_per_device'] * report['devices'] >= 0.9 * step['model_flops']

  # A teacher that is not there: one line, exit 2, before anything compiles.
  code = cli.main(['elastic-jax', 'compile', QUICK, '--topology=v5e:2x2',
                   f'--config.train.distill.teacher={tmp_path / "absent"}'])
  out, err = capsys.readouterr()
  lines = [l for l in err.splitlines() if l.startswith('elastic-jax')]
  assert code == 2 and not out and len(lines) == 1, err
  assert 'train.distill.teacher' in lines[0] and 'absent' in lines[0], lines[0]


def test_programs_and_flops_flags_choose_what_compile_builds(capsys):
  """--programs compiles only the named programs and --flops=none skips the FLOP-counting twin
  (memory and fit only); a wrong value of either is one line, before anything compiles."""
  pytest.importorskip('libtpu')
  code, out, err = run(capsys, 'compile', QUICK, '--topology=v5e:2x2', '--programs=dense_step',
                       '--flops=none')
  assert code == 0, err
  report = json.loads(out)
  assert list(report['programs']) == ['dense_step'] and report['fits']
  dense = report['programs']['dense_step']
  assert dense['memory_bytes']['total'] > 0 and dense['estimated_seconds'] is None
  assert report['masked_over_dense'] is None
  for flag, message in [('--programs=train', "unknown program(s) ['train']"),
                        ('--programs=,', 'no program to compile'),
                        ('--flops=exact', "unknown FLOP counting 'exact'")]:
    code, out, err = run(capsys, 'compile', QUICK, '--topology=v5e:2x2', flag)
    lines = [l for l in err.splitlines() if l.startswith('elastic-jax')]
    assert code == 2 and not out and len(lines) == 1 and message in lines[0], err
  # A library caller gets the same error, not an empty report.
  with pytest.raises(UserError, match='no program to compile'):
    aot.compile_report(load_config('quickstart', 'tiny'), 'v5e:2x2', programs=())
