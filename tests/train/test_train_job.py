"""Supernet training: resume after SIGKILL, sharded == single device, distillation, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO, xla_flags_with_devices
from flax import nnx

from elastic_jax import losses as loss_lib
from elastic_jax.errors import UserError
from elastic_jax.train.trainer import train
from elastic_jax.workdir import init_supernet

CLI = [sys.executable, '-m', 'elastic_jax.cli']


def run_cli(args, env=None, **kw):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  return subprocess.run(CLI + args, env=env, capture_output=True, text=True, cwd=REPO, **kw)


def losses(workdir: Path) -> dict[int, float]:
  """Logged training losses by step (the last line of a step wins: a resumed run repeats)."""
  out = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    d = json.loads(line)
    if 'loss' in d:
      out[d['step']] = d['loss']
  return out


def final_params(cfg, workdir):
  from elastic_jax.checkpoints import restore_params_if_any
  model = init_supernet(cfg)
  restore_params_if_any(workdir, model)
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def tiny_args(data_cache, workdir, *extra):
  return ['train', '--config=configs/quickstart.py:tiny', f'--workdir={workdir}',
          f'--config.data.cache_dir={data_cache}', '--config.train.log_every=1', *extra]


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted_run(tiny_cfg, data_cache, tmp_path):
  steps = ['--config.train.steps=16', '--config.train.checkpoint_every=4']
  full = tmp_path / 'full'
  r = run_cli(tiny_args(data_cache, full, *steps))
  assert r.returncode == 0, r.stderr[-2000:]

  killed = tmp_path / 'killed'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(CLI + tiny_args(data_cache, killed, *steps), env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [p for p in (killed / 'checkpoints').glob('*') if p.name.isdigit()]
    if any(int(p.name) >= 8 for p in done):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  last = max(int(p.name) for p in (killed / 'checkpoints').glob('*') if p.name.isdigit())
  assert last < 16, 'the run finished before it could be killed'
  r = run_cli(tiny_args(data_cache, killed, *steps))
  assert r.returncode == 0, r.stderr[-2000:]

  assert losses(killed) == pytest.approx(losses(full), rel=1e-6)
  tiny_cfg.train.steps = 16
  for a, b in zip(final_params(tiny_cfg, killed), final_params(tiny_cfg, full)):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-6


@pytest.mark.slow
def test_eight_devices_fsdp4_tensor2_equal_one_device(data_cache, tmp_path):
  """Sharded training computes what one device does, with the FSDP-sharded parameters gathered
  once per micro-batch (train.gather_params, the default) and with the layout left to XLA."""
  single = run_cli(tiny_args(data_cache, tmp_path / 'single', '--config.train.steps=3'))
  assert single.returncode == 0, single.stderr[-2000:]
  b = losses(tmp_path / 'single')
  for gather in (True, False):
    mesh = ['--config.mesh.data=1', '--config.mesh.fsdp=4', '--config.mesh.tensor=2',
            '--config.train.steps=3', f'--config.train.gather_params={gather}']
    sharded = run_cli(tiny_args(data_cache, tmp_path / f'sharded_{gather}', *mesh),
                      env={'XLA_FLAGS': xla_flags_with_devices(8)})
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    a = losses(tmp_path / f'sharded_{gather}')
    assert sorted(a) == [1, 2, 3]
    for step in a:
      assert a[step] == pytest.approx(b[step], rel=1e-5), (gather, step)


def test_block_preserving_loss_matches_hand_computation():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 5, 3))
  valid = np.ones((2, 5))
  valid[1, 3:] = 0

  def normalise(x, v):
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
      keep = v[b] > 0
      xs = x[b, keep]
      out[b, keep] = (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-6)
    return out

  expected = ((normalise(s, valid) - normalise(t, valid)) ** 2).sum() / (valid.sum() * 3)
  got = loss_lib.block_preserving(jnp.asarray(s), jnp.asarray(t), jnp.asarray(valid))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_logits_kl_is_zero_for_identical_and_positive_otherwise():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 3, 7)))
  w = jnp.ones((2, 3))
  assert abs(float(loss_lib.logits_kl(logits, logits, w, 2.0))) < 1e-6
  assert float(loss_lib.logits_kl(logits, logits[:, ::-1], w, 2.0)) > 0


def student_teacher_kl(cfg, workdir, teacher_dir):
  from elastic_jax import data, export
  from elastic_jax.checkpoints import restore_params_if_any
  from elastic_jax.evaluation import model_inputs
  teacher, _ = export.load(teacher_dir)
  model = init_supernet(cfg)
  restore_params_if_any(workdir, model)
  from elastic_jax.workdir import build_space
  arch = build_space(cfg).smallest()
  total = 0.0
  for batch in data.eval_batches(cfg.data):
    inputs = model_inputs({k: jnp.asarray(v) for k, v in batch.items()})
    total += float(loss_lib.logits_kl(model(inputs, arch), teacher(inputs),
                                     jnp.asarray(batch['weights']), 1.0))
  return total


@pytest.mark.slow
def test_kd_from_frozen_teacher_lowers_kl_faster(tiny_cfg, tmp_path):
  from conftest import randomize

  from elastic_jax import export
  from elastic_jax.workdir import build_space
  space = build_space(tiny_cfg)
  teacher = export.export(randomize(init_supernet(tiny_cfg, space), 7, 0.05), space.cfg,
                          space.largest())
  export.save(teacher, tmp_path / 'teacher', arch=space.largest())
  kl = {'init': student_teacher_kl(tiny_cfg, tmp_path / 'untrained', tmp_path / 'teacher')}
  for name, weight in (('kd', 1.0), ('ce', 0.0)):
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.train.steps = 20
    cfg.train.eval_every = 0
    cfg.train.distill.teacher = str(tmp_path / 'teacher')
    cfg.train.distill.logits_kl = weight
    cfg.train.distill.ce = 0.0 if weight else 1.0
    cfg.train.eval_archs = ['smallest']
    cfg.train.sampling = 'random'
    train(cfg, tmp_path / name, progress=False)
    kl[name] = student_teacher_kl(cfg, tmp_path / name, tmp_path / 'teacher')
  # Same steps, same data, same sub-networks: only the distillation term differs.
  assert kl['kd'] < 0.9 * kl['init'] and kl['kd'] < 0.9 * kl['ce'], kl


def test_bad_input_gives_clear_errors(tiny_cfg, tmp_path):
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.mesh.data = 3
  with pytest.raises(UserError, match='3 devices but 1 are available'):
    train(cfg, tmp_path / 'a', progress=False)
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.grad_accum = 3
  with pytest.raises(UserError, match='grad_accum'):
    train(cfg, tmp_path / 'b', progress=False)
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.distill.teacher = str(tmp_path / 'nowhere')
  with pytest.raises(UserError, match='train.distill.teacher'):
    train(cfg, tmp_path / 'c', progress=False)
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.sampling = 'everything'
  with pytest.raises(UserError, match='train.sampling'):
    train(cfg, tmp_path / 'd', progress=False)
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.logits_chunk = -8
  with pytest.raises(UserError, match=r'train.logits_chunk=-8 must be an integer >= 0'):
    train(cfg, tmp_path / 'e', progress=False)
  assert not (tmp_path / 'e').exists()
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.distill.start_step = -1
  with pytest.raises(UserError, match=r'train.distill.start_step=-1 must be an integer >= 0'):
    train(cfg, tmp_path / 'f', progress=False)
  assert not (tmp_path / 'f').exists()
  # A config.json edited by hand: ml_collections' own type check does not run there.
  values = tiny_cfg.to_dict()
  values['train']['unroll_subnets'] = 'yes'
  with pytest.raises(UserError, match=r"train.unroll_subnets='yes' must be True or False"):
    train(ml_collections.ConfigDict(values), tmp_path / 'g', progress=False)
  assert not (tmp_path / 'g').exists()


def test_in_place_block_preserving_distillation_warns(tiny_cfg, caplog):
  from elastic_jax.train.trainer import _distill_spec
  from elastic_jax.workdir import build_space
  cfg = tiny_cfg.copy_and_resolve_references()
  space = build_space(cfg)
  with caplog.at_level('WARNING'):
    _distill_spec(cfg, space, None)
  assert 'block_preserving' not in caplog.text
  cfg.train.distill.block_preserving = 1.0
  with caplog.at_level('WARNING'):
    spec, _ = _distill_spec(cfg, space, None)
  assert spec.in_place
  assert 'train.distill.block_preserving=1 with the in-place teacher' in caplog.text


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_one_error_for_a_reader_and_its_advice_works(
    tiny_cfg, tmp_path, capsys, caplog):
  """`evaluate` on a workdir whose latest checkpoint is damaged: one line, exit 2, nothing moved
  (it once evaluated step 4's weights with only a warning); moved aside as the line says, step
  4 is what it evaluates."""
  from elastic_jax import cli
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.steps = 8
  cfg.train.checkpoint_every = 4
  train(cfg, tmp_path, progress=False)
  latest = tmp_path / 'checkpoints' / '8'
  for f in latest.rglob('*'):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate every file
  capsys.readouterr()
  with caplog.at_level('WARNING'):
    code = cli.main(['elastic-jax', 'evaluate', f'--workdir={tmp_path}', '--arch=largest'])
  out, err = capsys.readouterr()
  assert code == 2 and not out and len(err.splitlines()) == 1, err
  assert err.startswith(f'elastic-jax evaluate: error: the latest checkpoint in {latest.parent} '
                        '(step 8) is unreadable'), err
  assert f'move {latest} out of {latest.parent}' in err and latest.is_dir()
  assert 'unreadable' not in caplog.text  # no warning besides the error
  aside = tmp_path / 'checkpoints_unreadable'
  aside.mkdir()
  latest.rename(aside / '8')
  from elastic_jax.checkpoints import restore_params_if_any
  assert restore_params_if_any(tmp_path, init_supernet(cfg)) == 4
  assert cli.main(['elastic-jax', 'evaluate', f'--workdir={tmp_path}', '--arch=largest']) == 0
  assert json.loads(capsys.readouterr().out)['step'] == 4


def test_loading_a_trained_supernet_draws_no_initialisation(tiny_cfg, tmp_path, monkeypatch):
  """A workdir with checkpoints is restored into a shapes-only supernet: no parameter is drawn
  (each draw compiled a program per shape, seconds of every command that reads W) and the values
  are the checkpoint's, as restored into the seeded initialisation. Without checkpoints it is the
  seeded initialisation itself."""
  from elastic_jax.checkpoints import restore_params_if_any
  from elastic_jax.workdir import load_supernet

  def params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))

  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.steps = 2
  cfg.train.checkpoint_every = 2
  fresh, step = load_supernet(cfg, str(tmp_path))
  assert step is None
  for a, b in zip(params(fresh), params(init_supernet(cfg)), strict=True):
    np.testing.assert_array_equal(a, b)
  train(cfg, tmp_path, progress=False)
  expected = init_supernet(cfg)
  assert restore_params_if_any(tmp_path, expected) == 2
  draws = []
  normal = jax.random.normal
  monkeypatch.setattr(jax.random, 'normal', lambda *a, **k: draws.append(a) or normal(*a, **k))
  model, step = load_supernet(cfg, str(tmp_path))
  assert step == 2 and not draws
  for a, b in zip(params(model), params(expected), strict=True):
    assert isinstance(a, jax.Array) and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(params(model), params(fresh)))  # trained


def test_a_resumed_run_initialises_nothing_and_continues_the_run(tiny_cfg, tmp_path,
                                                                 monkeypatch):
  """Resuming restores the checkpoint into the state's shapes: the seeded initialisation and
  the optimizer's initial state are not made first (their programs took 6 s of a 58 s resume
  of the README's run on this CPU); the run goes on as the uninterrupted one."""
  from elastic_jax.train import trainer
  made = []
  initial_state = trainer._initial_state
  monkeypatch.setattr(trainer, '_initial_state',
                      lambda *a, **k: made.append(1) or initial_state(*a, **k))
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 4, 1, 2
  train(cfg, tmp_path / 'full', progress=False)
  assert len(made) == 1
  # The run as if stopped after its checkpoint at step 2 (what a kill leaves).
  shutil.copytree(tmp_path / 'full', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '4')
  train(cfg, tmp_path / 'resumed', progress=False)
  assert len(made) == 1  # the resume made no initial state
  assert losses(tmp_path / 'resumed') == pytest.approx(losses(tmp_path / 'full'), rel=1e-6)
  for a, b in zip(final_params(cfg, tmp_path / 'resumed'), final_params(cfg, tmp_path / 'full'),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_divergence_stops_with_clear_error_and_keeps_last_good_checkpoint(tiny_cfg, tmp_path):
  from elastic_jax.checkpoints import restore_params_if_any
  from elastic_jax.train.trainer import TrainingDiverged
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.steps = 12
  cfg.train.checkpoint_every = 1  # step 1's update uses the warm-up's zero learning rate
  cfg.train.warmup_steps = 4
  cfg.train.grad_clip = 0.0
  cfg.train.learning_rate = 1e38  # overflows within a few steps of the warm-up
  with pytest.raises(TrainingDiverged, match='training diverged at step'):
    train(cfg, tmp_path, progress=False)
  model = init_supernet(cfg)
  step = restore_params_if_any(tmp_path, model)
  assert step is not None and step < 12
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_batch_not_divisible_by_the_data_axes(tiny_cfg, tmp_path):
  from elastic_jax import parallel
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  parallel.check_batch(4, mesh)
  with pytest.raises(UserError, match=r'^the training batch has 6 rows \(data.batch_size\) but the '
                     r'mesh splits batches 4 ways \(mesh.data=2 x mesh.fsdp=2\); make '
                     r'data.batch_size a multiple of 4 or change mesh.data / mesh.fsdp$'):
    parallel.check_batch(6, type('M', (), {'shape': {'data': 2, 'fsdp': 2, 'tensor': 1}})())


def test_microbatches_take_strided_rows_so_each_spans_every_device():
  from elastic_jax.train.step import split_microbatches
  batch = {'tokens': np.arange(24).reshape(12, 2)}
  micro = split_microbatches(batch, 3)
  assert micro['tokens'].shape == (3, 4, 2)
  for i in range(3):
    np.testing.assert_array_equal(micro['tokens'][i], batch['tokens'][i::3])


def test_training_again_in_the_same_process_reuses_the_traced_step(tiny_cfg, tmp_path,
                                                                  monkeypatch):
  """A second `train` with the same config (a notebook cell re-run, a resume) runs the step the
  first one traced and compiled: built once, traced once, the same losses. Another config, or an
  architecture file whose contents changed, builds its own step."""
  from elastic_jax import arch as arch_lib
  from elastic_jax import parallel
  from elastic_jax.train import trainer
  from elastic_jax.workdir import build_space
  built = []
  build_step = trainer.build_step
  monkeypatch.setattr(trainer, 'build_step', lambda *a, **k: built.append(a) or build_step(*a, **k))
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.steps, cfg.train.log_every = 2, 1
  train(cfg, tmp_path / 'a', progress=False)
  train(cfg, tmp_path / 'b', progress=False)
  mesh = parallel.make_mesh(cfg.get('mesh', {}))
  setup = trainer.shared_step(cfg, mesh)
  assert len(built) == 1 and setup.step._cache_size() == 1  # one build, one trace
  assert losses(tmp_path / 'a') == losses(tmp_path / 'b')

  other = cfg.copy_and_resolve_references()
  other.train.learning_rate *= 2  # another schedule: another step
  assert trainer.shared_step(other, mesh) is not setup and len(built) == 2
  space = build_space(cfg)
  arch_file = tmp_path / 'arch.json'
  fixed = cfg.copy_and_resolve_references()
  fixed.train.arch = str(arch_file)
  arch_file.write_text(json.dumps(arch_lib.to_json(space.largest())))
  first = trainer.shared_step(fixed, mesh)
  assert trainer.shared_step(fixed, mesh) is first
  arch_file.write_text(json.dumps(arch_lib.to_json(space.smallest())))
  assert trainer.shared_step(fixed, mesh) is not first  # same path, other contents
