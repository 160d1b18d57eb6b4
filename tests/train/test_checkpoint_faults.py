"""Checkpoints under faults: a refused or failed save is an error; an unreadable checkpoint is
moved aside and its step saved again; kill -9 at several points of a checkpoint write, then
resume, ends with the parameters of an uninterrupted run."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from flax import nnx

from elastic_jax import checkpoints, cli
from elastic_jax.errors import UserError
from elastic_jax.train.step import TrainState
from elastic_jax.train.trainer import train
from elastic_jax.workdir import apply_init_from, build_space, init_supernet


def tiny_state(value: float) -> TrainState:
  params = nnx.State({'model': {'w': jnp.full((3,), value)}, 'proj': {}})
  return TrainState(step=jnp.int32(0), params=params, opt_state={'m': jnp.zeros(3)},
                    rng=jax.random.key_data(jax.random.key(0)))


def test_a_save_orbax_refuses_is_an_error_not_silence(tmp_path):
  ckpt = checkpoints.Checkpoints(tmp_path)
  try:
    ckpt.save(4, tiny_state(1.0), {'step': 4})
    ckpt.wait()
    # Orbax skips (returns False for) a step not newer than its latest one.
    with pytest.raises(checkpoints.CheckpointError,
                       match='refused to save the checkpoint of step 4: .* holds step 4 already'):
      ckpt.save(4, tiny_state(2.0), {'step': 4})
    with pytest.raises(checkpoints.CheckpointError, match='step 3'):
      ckpt.save(3, tiny_state(2.0), {'step': 3})
  finally:
    ckpt.close()


def test_a_failing_save_names_the_step_and_the_cause(tmp_path):
  ckpt = checkpoints.Checkpoints(tmp_path)
  try:
    # A meta dict JSON cannot hold: the save fails (now or when the async write completes).
    with pytest.raises(checkpoints.CheckpointError, match='checkpoint') as info:
      ckpt.save(1, tiny_state(1.0), {'step': object()})
      ckpt.wait()
    assert 'bound method' not in str(info.value)
  finally:
    ckpt.close()


def test_a_checkpoint_whose_meta_does_not_hold_its_step_is_unreadable(tmp_path, caplog):
  """A meta item that is not {'step': <its step>, ...} (emptied, a string step, another step)
  is an unreadable checkpoint like any other: the restore falls back to the one before (it
  raised KeyError / ValueError from the reader)."""
  ckpt = checkpoints.Checkpoints(tmp_path)
  try:
    ckpt.save(4, tiny_state(1.0), {'step': 4})
    ckpt.wait()
    ckpt.save(8, tiny_state(2.0), {'step': 8})
    ckpt.wait()
    metadata = tmp_path / 'checkpoints' / '8' / 'meta' / 'metadata'
    assert metadata.is_file()
    for bad in ('{}', '{"step": "x"}', '{"step": 4}', '[8]'):
      metadata.write_text(bad)
      caplog.clear()
      with caplog.at_level(logging.WARNING):
        state, meta = ckpt.restore_latest(checkpoints.abstract_of(tiny_state(0.0)))
      assert meta['step'] == 4 and int(state.step) == 4, bad
      assert float(state.params['model']['w'][0]) == 1.0
      assert 'checkpoint at step 8' in caplog.text and 'does not hold step 8' in caplog.text
      # Restoring moved step 8 aside: put it back for the next case.
      (tmp_path / 'checkpoints_unreadable' / '8').rename(tmp_path / 'checkpoints' / '8')
      ckpt.manager.reload()
  finally:
    ckpt.close()


def test_describe_gives_words():
  assert checkpoints.describe(ValueError('bad shape\nmore')) == 'ValueError: bad shape'
  assert checkpoints.describe(KeyError()) == 'KeyError'
  long = checkpoints.describe(OSError('cannot open /' + 'd/' * 200 + 'x'))
  assert len(long) == 240 and long.startswith('OSError: cannot open /d/d/') and long.endswith('...')


@pytest.mark.slow
def test_unreadable_checkpoint_is_moved_aside_and_its_step_saved_again(tiny_cfg, tmp_path,
                                                                       caplog):
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.steps = 8
  cfg.train.checkpoint_every = 4
  cfg.train.eval_every = 0
  train(cfg, tmp_path, progress=False)
  reference = init_supernet(cfg)
  assert checkpoints.restore_params_if_any(tmp_path, reference) == 8
  latest = tmp_path / 'checkpoints' / '8'
  for f in latest.rglob('*'):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate every file

  # A reader that does not train refuses (no older weights in place of the latest), names the
  # step that reads and the ways on, and leaves the run's directory alone.
  before = _files(tmp_path / 'checkpoints')
  with pytest.raises(checkpoints.UnreadableLatest) as info:
    checkpoints.restore_params_if_any(tmp_path, init_supernet(cfg))
  message = str(info.value)
  assert message.startswith(f'the latest checkpoint in {tmp_path / "checkpoints"} (step 8) is '
                            'unreadable (step 8: ')
  assert '; step 4 reads. To use step 4, move ' in message and 'train steps 5-8 again' in message
  assert '\n' not in message and 'bound method' not in message
  assert _files(tmp_path / 'checkpoints') == before

  # The training run moves it aside, retrains steps 5-8 and saves step 8 again.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train(cfg, tmp_path, progress=False)
  moved = tmp_path / 'checkpoints_unreadable' / '8'
  assert moved.is_dir() and latest.is_dir()
  warning = [r.getMessage() for r in caplog.records if 'is unreadable' in r.getMessage()]
  assert warning and 'step 8' in warning[0] and str(moved) in warning[0]
  assert 'bound method' not in warning[0]
  retrained = init_supernet(cfg)
  assert checkpoints.restore_params_if_any(tmp_path, retrained) == 8
  for a, b in zip(jax.tree.leaves(nnx.state(retrained, nnx.Param)),
                  jax.tree.leaves(nnx.state(reference, nnx.Param)), strict=True):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-6


@pytest.mark.slow
def test_when_no_checkpoint_is_readable_they_are_kept_where_the_error_says(tiny_cfg, tmp_path):
  """Every checkpoint unreadable: the run stops with one error saying where they were moved,
  and they are there (the failed run's cleanup once deleted them with the rest of what it
  created); run again, it trains from scratch."""
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.steps = 8
  cfg.train.checkpoint_every = 4
  cfg.train.eval_every = 0
  train(cfg, tmp_path, progress=False)
  sizes = {}
  for f in (tmp_path / 'checkpoints').rglob('*'):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
      sizes[f.relative_to(tmp_path / 'checkpoints')] = f.stat().st_size
  assert {p.parts[0] for p in sizes} == {'4', '8'}
  with pytest.raises(UserError, match='no readable checkpoint') as info:
    train(cfg, tmp_path, progress=False)
  aside = tmp_path / 'checkpoints_unreadable'
  assert f'moved to {aside}; run again to train from scratch' in str(info.value)
  kept = {f.relative_to(aside): f.stat().st_size for f in aside.rglob('*') if f.is_file()}
  assert {p: n for p, n in kept.items() if p in sizes} == sizes  # every truncated file, as left
  train(cfg, tmp_path, progress=False)
  assert checkpoints.restore_params_if_any(tmp_path, init_supernet(cfg)) == 8


def _files(directory):
  return {f.relative_to(directory): f.read_bytes() for f in directory.rglob('*') if f.is_file()}


@pytest.mark.slow
def test_checkpoints_of_another_model_are_a_config_mismatch_left_in_place(tiny_cfg, tmp_path,
                                                                          capsys, caplog,
                                                                          monkeypatch):
  """A workdir whose config.json was edited so that its checkpoints no longer fit the model
  (hidden size, vocabulary, layers): evaluate called them unreadable, and train moved them aside
  as unreadable. Now: one line naming the array, its saved and its configured shape, and the fix;
  exit 2; every checkpoint where it was. A checkpoint whose arrays are damaged but whose metadata
  fits is still unreadable (moved aside by train, the previous one used)."""
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_every = 4, 2, 0
  w = tmp_path / 'w'
  train(cfg, w, progress=False)
  capsys.readouterr()
  ckpt = w / 'checkpoints'
  saved = _files(ckpt)
  config = json.loads((w / 'config.json').read_text())

  def edited(edit):
    c = json.loads(json.dumps(config))
    edit(c)
    (w / 'config.json').write_text(json.dumps(c))

  def wider(c):
    c['space']['hidden'] = [32, 64]

  def more_layers(c):
    c['space']['num_layers'] = 3

  cases = [
      (wider, 'parameter embed/tokens is saved with shape (1024, 48) but the config builds '
              '(1024, 64), and 19 more arrays differ', ('evaluate', 'train')),
      (lambda c: c['model'].update(vocab_size=2048),
       'parameter embed/tokens is saved with shape (1024, 48) but the config builds (2048, 48))',
       ('evaluate',)),
      (more_layers, 'the config builds parameter layers/2/blocks/transformer/attn/k (48, 2, 8), '
                    'which the checkpoint does not hold', ('evaluate',)),
  ]
  # Told from the checkpoint's metadata before Orbax reads any array: a restore that fails part-way
  # left its array reads abandoned ("coroutine ... was never awaited" after the error line).
  restores = []
  restore = ocp.CheckpointManager.restore
  monkeypatch.setattr(ocp.CheckpointManager, 'restore',
                      lambda *a, **k: restores.append(1) or restore(*a, **k))
  for edit, detail, commands in cases:
    edited(edit)
    for command in commands:
      code = cli.main(['elastic-jax', command, f'--workdir={w}',
                       *(['--arch=largest'] if command == 'evaluate' else [])])
      out, err = capsys.readouterr()
      assert not restores
      assert code == 2 and not out and len(err.splitlines()) == 1, err
      assert err.startswith(f'elastic-jax {command}: error: the checkpoints in {ckpt} do not fit '
                            f'the model of the config (step 4: {detail}'), err
      assert err.rstrip().endswith('restore the config that wrote them, or use a new --workdir '
                                   'for this config (the checkpoints are left as they are)'), err
      assert 'unreadable' not in caplog.text
      assert _files(ckpt) == saved and not (w / checkpoints.UNREADABLE_DIRNAME).exists()

  # train.init_from naming that workdir, from a config of another model: its own advice.
  other = cfg.copy_and_resolve_references()
  other.space.hidden = (32, 64)
  space = build_space(other)
  with pytest.raises(UserError, match=r"^config field train.init_from='.*': its checkpoints do not "
                     r'fit the model of this config \(step 4: parameter embed/tokens .*point it '
                     r'at a run of the same model and space$'):
    apply_init_from(str(w), init_supernet(other, space), space)
  # ... and from the config of the same model, its latest supernet (the workdir's config.json
  # once made it read as an export: 'is the workdir of a run, not an exported model').
  (w / 'config.json').write_text(json.dumps(config))
  same = cfg.copy_and_resolve_references()
  space = build_space(same)
  assert apply_init_from(str(w), init_supernet(same, space), space) == f'workdir {w}'
  # The library's train() with another model's config refuses before it rewrites config.json
  # (it did rewrite it: the checkpoints' only description was lost).
  written = (w / 'config.json').read_bytes()
  with pytest.raises(UserError, match=r'holds a run of another config \(space.hidden: '):
    train(other, w, progress=False)
  assert (w / 'config.json').read_bytes() == written and _files(ckpt) == saved

  # Damaged arrays under intact metadata: unreadable, as before (not a config mismatch).
  for f in (ckpt / '4' / 'params').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(checkpoints.UnreadableLatest, match=r'\(step 4\) is unreadable .*; step 2 '
                     r'reads\.'):
    checkpoints.restore_params_if_any(w, init_supernet(cfg))


# A training run that kills itself (SIGKILL) when its checkpoint write of step `at` reaches
# `point`: Orbax's own file operations are wrapped, so the kill lands inside the real write.
DRIVER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import load_config
    from orbax.checkpoint._src.path import async_path
    from elastic_jax.train.trainer import train

    # The runs share compiled programs through the test run's persistent cache (conftest.py;
    # its folder comes with the environment): one compile, not six.
    point, at, workdir, cache = sys.argv[1:5]
    tmp = f'/{{at}}.orbax-checkpoint-tmp'
    write_text, rename = async_path.write_text, async_path.rename

    def die():
      os.kill(os.getpid(), signal.SIGKILL)

    async def write_text_then_maybe_die(path, text):
      # 'arrays': the first item's array metadata is being written, nothing is complete.
      if point == 'arrays' and tmp in str(path) and str(path).endswith('_METADATA'):
        die()
      return await write_text(path, text)

    async def rename_and_maybe_die(src, dst):
      step_dir = str(src).endswith(tmp)
      if point == 'before_commit' and step_dir:
        die()  # every item written and committed inside the temporary step directory
      out = await rename(src, dst)
      if point == 'after_commit' and step_dir:
        die()  # the step directory renamed; Orbax's bookkeeping after it never ran
      return out

    async_path.write_text, async_path.rename = write_text_then_maybe_die, rename_and_maybe_die
    cfg = load_config('quickstart', 'tiny')
    cfg.data.cache_dir = cache
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_every = 12, 4, 0
    cfg.train.keep_checkpoints = 2
    train(cfg, workdir, progress=False)
''')


@pytest.mark.slow
def test_kill_during_checkpoint_writes_then_resume_equals_uninterrupted_run(tiny_cfg, data_cache,
                                                                            tmp_path):
  """Kill points: while the arrays are written (nothing complete), with everything written but
  the step directory not yet renamed, right after the rename (Orbax's bookkeeping undone); each
  run resumes the workdir the previous one was killed in."""
  driver = tmp_path / 'driver.py'
  driver.write_text(DRIVER.format(tests=str(REPO / 'tests')))
  killed = tmp_path / 'killed'
  env_cmd = [sys.executable, str(driver)]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO)}

  def run(point, at, workdir):
    return subprocess.run(env_cmd + [point, str(at), str(workdir), str(data_cache)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)

  full = run('none', 0, tmp_path / 'full')  # uninterrupted
  assert full.returncode == 0, full.stderr[-3000:]
  # Each run resumes the last one's workdir and is killed during one checkpoint write.
  for point, at in (('arrays', 8), ('before_commit', 8), ('after_commit', 8), ('arrays', 12),
                    ('none', 0)):
    r = run(point, at, killed)
    if point == 'none':
      assert r.returncode == 0, r.stderr[-3000:]
    else:
      assert r.returncode == -9, (f'the run was not killed at {point} of step {at} (exit '
                                  f'{r.returncode}): {r.stderr[-3000:]}')
    steps = sorted(int(p.name) for p in (killed / 'checkpoints').iterdir() if p.name.isdigit())
    expected_latest = {('arrays', 8): 4, ('before_commit', 8): 4, ('after_commit', 8): 8,
                       ('arrays', 12): 8, ('none', 0): 12}[(point, at)]
    assert steps and steps[-1] == expected_latest, (point, at, steps)

  a, b = init_supernet(tiny_cfg), init_supernet(tiny_cfg)
  assert checkpoints.restore_params_if_any(killed, a) == 12
  assert checkpoints.restore_params_if_any(tmp_path / 'full', b) == 12
  leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
