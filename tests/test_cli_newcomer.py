"""The CLI as a newcomer meets it (issue 20): one test (or more) per defect, each of which failed
on the code before the fix. Tiny quickstart settings; one trained workdir shared by the module."""

from __future__ import annotations

import configparser
import contextlib
import io
import json
import logging
import os
import shutil
import stat

import numpy as np
import pytest
from conftest import REPO, load_config

from elastic_jax import cli, cli_flags

QUICK = f'--config={REPO}/configs/quickstart.py:tiny'


def run(*args) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(['elastic-jax', *map(str, args)])
  return code, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
  return [l for l in err.splitlines() if l.startswith('elastic-jax')]


def assert_one_line_exit_2(result, *needles):
  code, out, err = result
  assert code == 2, err
  lines = error_lines(err)
  assert len(lines) == 1 and 'Traceback' not in err, err
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return f'--config.data.cache_dir={tmp_path_factory.mktemp("cache")}'


@pytest.fixture(scope='module')
def trained(tmp_path_factory, cache):
  """A workdir trained 4 steps (checkpoints at 2 and 4) and an arch of its space."""
  root = tmp_path_factory.mktemp('trained')
  work = root / 'w'
  code, _, err = run('train', QUICK, cache, f'--workdir={work}', '--config.train.steps=4',
                     '--config.train.checkpoint_every=2', '--config.train.log_every=1')
  assert code == 0, err
  code, out, _ = run('sample', QUICK, '--seed=5')
  arch = root / 'arch.json'
  arch.write_text(out)
  return work, arch, err


# -- 1. export never deletes what is already there -------------------------------------------


def test_export_refuses_a_users_directory_and_file(trained, cache, tmp_path):
  work, arch, _ = trained
  user_dir = tmp_path / 'mine'
  user_dir.mkdir()
  (user_dir / 'notes.txt').write_text('precious')
  assert_one_line_exit_2(run('export', f'--workdir={work}', f'--arch={arch}',
                             f'--out={user_dir}', '--overwrite'), 'not an exported model')
  assert (user_dir / 'notes.txt').read_text() == 'precious'
  assert sorted(p.name for p in user_dir.iterdir()) == ['notes.txt']
  user_file = tmp_path / 'file.bin'
  user_file.write_bytes(b'\x00data')
  assert_one_line_exit_2(run('export', f'--workdir={work}', f'--arch={arch}',
                             f'--out={user_file}'), 'existing file')
  assert user_file.read_bytes() == b'\x00data'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['file.bin', 'mine']  # no temporaries


def test_export_replaces_an_earlier_export_only_with_overwrite(trained, tmp_path):
  work, arch, _ = trained
  out = tmp_path / 'dense'
  assert run('export', f'--workdir={work}', f'--arch={arch}', f'--out={out}')[0] == 0
  first = (out / 'model.safetensors').read_bytes()
  assert_one_line_exit_2(run('export', f'--workdir={work}', f'--arch={arch}', f'--out={out}'),
                         '--overwrite')
  code, _, err = run('export', f'--workdir={work}', f'--arch={arch}', f'--out={out}',
                     '--overwrite')
  assert code == 0, err
  assert (out / 'model.safetensors').read_bytes() == first  # same supernet, same arch
  assert sorted(p.name for p in tmp_path.iterdir()) == ['dense']


# -- 2. another config into an existing workdir --------------------------------------------


def test_another_config_into_a_workdir_changes_nothing_and_names_the_fields(trained, cache,
                                                                            caplog):
  work, arch, _ = trained
  before = {p: p.read_bytes() for p in work.rglob('*') if p.is_file()}
  with caplog.at_level(logging.WARNING):
    line = assert_one_line_exit_2(
        run('train', QUICK, cache, f'--workdir={work}', '--config.space.ffn=(32, 48)',
            '--config.train.learning_rate=0.01'),
        'space.ffn: [32, 64] -> [32, 48]', 'train.learning_rate: 0.003 -> 0.01')
  assert 'delete' not in line
  assert not [r for r in caplog.records if 'unreadable' in r.getMessage()]
  after = {p: p.read_bytes() for p in work.rglob('*') if p.is_file()}
  assert after == before  # config.json included
  code, out, err = run('evaluate', f'--workdir={work}', f'--arch={arch}')
  assert code == 0, err and np.isfinite(json.loads(out)['loss'])


def test_a_reading_command_with_another_model_config_stops_too(trained, cache):
  work, arch, _ = trained
  assert_one_line_exit_2(run('evaluate', QUICK, cache, f'--workdir={work}', f'--arch={arch}',
                             '--config.model.max_len=64'), 'model.max_len: 128 -> 64')


@pytest.mark.parametrize('continuing', [True, False])
def test_how_the_supernet_runs_may_change_on_a_workdir(tmp_path, continuing):
  """model.attention, model.remat and model.skip_width_blocks change how the supernet runs, not
  its arrays or its function: a workdir accepts them changed; a field beside them still stops."""
  from elastic_jax import workdir as workdir_lib
  from elastic_jax.errors import UserError
  cfg = load_config('gpt2_medium_supernet', 'runlocal')
  workdir_lib.save_config(tmp_path, cfg)
  other = load_config('gpt2_medium_supernet', 'runlocal')
  other.model.attention = 'splash'
  other.model.remat = 'full'
  other.model.skip_width_blocks = not cfg.model.skip_width_blocks
  assert workdir_lib.check_same_run(tmp_path, other, continuing=continuing)
  other.model.max_len = 2 * cfg.model.max_len
  with pytest.raises(UserError, match='model.max_len'):
    workdir_lib.check_same_run(tmp_path, other, continuing=continuing)


# -- 3. silent wrong results ---------------------------------------------------------------


@pytest.mark.parametrize('positions', ['learned', 'rotary'])
def test_seq_len_beyond_max_len_is_an_error(cache, tmp_path, positions):
  arch = tmp_path / 'a.json'
  arch.write_text(run('sample', QUICK)[1])
  assert_one_line_exit_2(run('evaluate', QUICK, cache, f'--arch={arch}',
                             f'--config.model.positions={positions}',
                             '--config.model.max_len=16'),
                         'data.seq_len=32 exceeds model.max_len=16')


def test_missing_workdir_is_an_error_not_the_initialisation(trained, cache, tmp_path):
  _, arch, _ = trained
  typo = tmp_path / 'wrok'
  assert_one_line_exit_2(run('evaluate', QUICK, cache, f'--workdir={typo}', f'--arch={arch}'),
                         'does not exist')
  assert_one_line_exit_2(run('export', f'--workdir={typo}', '--pick=knee'), 'does not exist')
  assert_one_line_exit_2(run('export', QUICK, f'--workdir={typo}', f'--arch={arch}',
                             f'--out={tmp_path / "o"}'), 'does not exist')
  assert not typo.exists() and not (tmp_path / 'o').exists()


@pytest.mark.parametrize('steps', [0, -5])
def test_nonpositive_steps_is_an_error_before_anything_is_created(cache, tmp_path, steps):
  assert_one_line_exit_2(run('train', QUICK, cache, f'--workdir={tmp_path / "w"}',
                             f'--config.train.steps={steps}'), 'train.steps')
  assert not (tmp_path / 'w').exists()


def test_non_utf8_text_names_file_and_byte_offset(cache, tmp_path):
  good = 'a line of text\n' * 200
  path = tmp_path / 'corpus.txt'
  path.write_bytes(good.encode() + b'caf\xe9 au lait\n' + good.encode())
  offset = len(good.encode()) + 3  # by hand: the Latin-1 byte after 'caf'
  common = ['data', QUICK, cache, '--config.data.source=text_files',
            f"--config.data.paths=('{path}',)", '--config.data.doc_boundary=line',
            '--config.data.tokenizer=bytes',
            '--config.model.vocab_size=512']
  assert_one_line_exit_2(run(*common), str(path), f'byte offset {offset}', '0xe9',
                         'data.encoding_errors')
  code, out, err = run(*common, "--config.data.encoding_errors=replace")
  assert code == 0, err


# -- 4. the README's examples (the block test is tests/test_readme.py) ---------------------


@pytest.mark.parametrize('name, arg', [('quickstart', None), ('quickstart', 'tiny'),
                                       ('bert_elm', None), ('bert_elm', 'tiny'),
                                       ('bert_elm', 'runlocal'), ('shakespeare_decoder', 'tiny'),
                                       ('shakespeare_decoder', 'small')])
def test_every_config_gives_the_proxies_the_batches_they_read(name, arg):
  cfg = load_config(name, arg)
  assert cfg.proxy.num_batches <= cfg.data.eval_batches


def test_a_training_free_search_leaves_the_config_for_export(cache, tmp_path):
  work = tmp_path / 'w'
  code, _, err = run('search', QUICK, cache, f'--workdir={work}', '--config.search.fitness=wpca',
                     '--config.search.pop_size=4', '--config.search.generations=1',
                     '--config.proxy.num_batches=1', '--config.search.latency=False')
  assert code == 0, err
  saved = json.loads((work / 'config.json').read_text())
  assert saved['search']['fitness'] == 'wpca' and saved['model']['max_len'] == 128
  code, out, err = run('export', f'--workdir={work}', '--pick=index:-1',
                       f'--out={tmp_path / "best"}')
  assert code == 0, err


# -- 5. one line where one line was promised -------------------------------------------------


def test_override_typo_is_one_line_with_the_suggestion(tmp_path):
  assert_one_line_exit_2(run('train', QUICK, f'--workdir={tmp_path / "w"}',
                             '--config.train.step=5'),
                         '--config.train.step=5', "did you mean 'steps'")
  assert_one_line_exit_2(run('info', QUICK, '--config.dta.seq_len=5'), "'dta'")
  assert not (tmp_path / 'w').exists()


def test_glue_task_for_training_points_to_finetune(cache, tmp_path):
  assert_one_line_exit_2(run('train', QUICK, cache, f'--workdir={tmp_path / "w"}',
                             '--config.data.task=glue', '--config.data.source=glue',
                             f'--config.data.glue_dir={tmp_path}'), 'finetune')
  assert not (tmp_path / 'w').exists()


def test_evaluate_model_without_data_section_and_model_that_is_a_workdir(trained, tmp_path):
  from flax import nnx

  from elastic_jax import export as export_lib
  from elastic_jax.workdir import build_space
  work, arch, _ = trained
  cfg = load_config('quickstart', 'tiny')
  space = build_space(cfg)
  from elastic_jax.model.supernet import Model
  dense = export_lib.export(Model(space.model, space.cfg.supernet_dims(), rngs=nnx.Rngs(0)),
                            space.cfg, space.smallest())
  export_lib.save(dense, tmp_path / 'bare')  # no data section, no tokenizer
  assert_one_line_exit_2(run('evaluate', f'--model={tmp_path / "bare"}'), 'no data section',
                         '--config')
  assert_one_line_exit_2(run('evaluate', f'--model={work}'), 'workdir of a run', '--workdir')


@pytest.mark.parametrize('config_arg, reason', [
    ('shakespeare_decoder.py:smal', "takes '', 'small' or 'tiny', got 'smal'"),
    ('quickstart.py:smal', "got 'smal'"),
])
def test_config_argument_typo_keeps_the_reason(config_arg, reason):
  assert_one_line_exit_2(run('info', f'--config={REPO}/configs/{config_arg}'), reason)


# -- 6. help -------------------------------------------------------------------------------


@pytest.mark.parametrize('name', list(cli.COMMANDS))
def test_every_command_has_help_listing_its_flags_and_config_fields(name):
  code, out, err = run(name, '--help')
  assert code == 0, err
  command = cli.COMMANDS[name]
  for flag in ('config',) + command.flags:
    assert f'--{flag}' in out
  for section in command.sections:
    assert f'  {section}: ' in out  # and where its fields are documented:
  for doc in {cli_flags.SECTION_DOCS[s].split()[0] for s in command.sections if s != 'seed'}:
    assert (REPO / doc).is_file(), doc


def test_help_with_a_config_lists_the_values():
  code, out, _ = run('train', QUICK, '--config.train.steps=7', '--help')
  assert code == 0 and '--config.train.steps=7' in out and '--config.data.seq_len=32' in out


def test_version_is_the_packages():
  parser = configparser.ConfigParser()
  parser.read(REPO / 'setup.cfg')
  code, out, _ = run('--version')
  assert code == 0 and out.strip() == f"elastic-jax {parser['metadata']['version']}"


def test_overrides_without_config_name_the_problem(trained):
  work, _, _ = trained
  assert_one_line_exit_2(run('search', f'--workdir={work}', '--config.search.generations=3'),
                         'no --config was given')
  assert_one_line_exit_2(run('export', '--n=3'), 'takes no flag --n')
  assert_one_line_exit_2(run('info', 'configs/quickstart.py'), 'unexpected argument')


# -- 7. misleading output ------------------------------------------------------------------


def test_progress_bar_names_what_it_shows(trained):
  work, _, err = trained
  lines = [json.loads(l) for l in (work / 'metrics.jsonl').read_text().splitlines()]
  last = [l for l in lines if 'loss' in l][-1]
  # The bar's last training values are the log's, under their names.
  bar = err.replace('\r', '\n')
  assert f"largest ce={last['train/largest/ce']:.4g}" in bar
  assert f"loss (sum of 4)={last['loss']:.4g}" in bar
  assert 'loss=' not in bar.replace('val loss=', '').replace('sum of 4)=', '')


def test_training_one_arch_reports_that_arch(cache, tmp_path):
  arch = tmp_path / 'a.json'
  arch.write_text(run('sample', QUICK, '--seed=2')[1])
  work = tmp_path / 'w'
  code, out, err = run('train', QUICK, cache, f'--workdir={work}', f'--config.train.arch={arch}',
                       '--config.train.steps=2', '--config.train.checkpoint_every=2')
  assert code == 0, err
  result = json.loads(out)  # stdout holds the result alone (the log lines go to stderr)
  assert set(k for k in result if k.startswith('eval/')) == {'eval/arch/loss',
                                                             'eval/arch/perplexity'}
  code, out, err2 = run('evaluate', f'--workdir={work}', f'--arch={arch}')
  assert code == 0, err2
  params = json.loads(out)
  assert result['eval/arch/loss'] == pytest.approx(params['loss'], rel=1e-5)
  assert f"{params['params']:,} parameters" in err and 'architectures' not in err


def test_corrupt_checkpoint_warning_is_readable_and_the_resumed_step_is_said(trained, cache,
                                                                              tmp_path, caplog):
  work = tmp_path / 'w'
  shutil.copytree(trained[0], work)
  for f in (work / 'checkpoints' / '4' / 'params').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.write_bytes(f.read_bytes()[:20])
  with caplog.at_level(logging.WARNING):
    code, _, err = run('train', f'--workdir={work}')
  assert code == 0, err
  warnings = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert warnings and all('<bound method' not in w for w in warnings)
  assert 'resuming from the checkpoint at step 2' in err


def test_no_readable_checkpoint_is_one_error_not_orbax_leftovers(trained, tmp_path):
  """Every checkpoint unreadable, read by `search` in its own process: one error (with advice
  that deletes nothing), no warning before it. Orbax's other reads, finishing after
  the failed one, printed 'Event loop is closed' tracebacks and never-retrieved task errors (up
  to 385 lines; how many varied from run to run), so the command runs 4 times."""
  import subprocess
  import sys
  work = tmp_path / 'w'
  shutil.copytree(trained[0], work)
  for f in (work / 'checkpoints').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.write_bytes(f.read_bytes()[:20])
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  for _ in range(4):
    r = subprocess.run([sys.executable, '-m', 'elastic_jax.cli', 'search', f'--workdir={work}'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith('elastic-jax search: error: no readable checkpoint in')
    assert 'step 4: ' in lines[0] and 'step 2: ' in lines[0]
    assert 'restore the workdir from a copy, or run `elastic-jax train` on it' in lines[0]
    assert 'delete' not in lines[0]


def test_summary_lists_every_generation():
  from elastic_jax.search import report
  n = 13
  history = {'best': np.linspace(5, 4, n)[:, None], 'n_evals': np.arange(1, n + 1) * 8,
             'hv': np.zeros(n), 'front_size': np.ones(n, int), 'feasible': np.ones(n, int),
             'seconds': np.arange(n, dtype=float)}
  text = report.summary_markdown(_pareto(['loss']), history)
  rows = [l for l in text.split('## History')[1].splitlines() if l.startswith('| ')][1:]
  assert [int(r.split('|')[1]) for r in rows] == list(range(1, n + 1))
  assert 'hypervolume' not in text  # one objective: no hypervolume


def test_a_finished_search_run_again_is_reported_unchanged(cache, tmp_path):
  work = tmp_path / 'w'
  args = ['search', QUICK, cache, f'--workdir={work}', '--config.search.fitness=wpca',
          '--config.search.pop_size=4', '--config.search.generations=1',
          '--config.proxy.num_batches=1', '--config.search.latency_max=2']
  assert run(*args)[0] == 0
  before = {p.name: p.read_bytes() for p in (work / 'search').iterdir()}
  code, out, err = run(*args)
  assert code == 0, err
  assert 'measuring latency' not in err and 'reporting it unchanged' in err
  assert {p.name: p.read_bytes() for p in (work / 'search').iterdir()} == before


# -- 8. plots ------------------------------------------------------------------------------


_ARCH = {'hidden': 32, 'depth': 1, 'head_dim': 8,
         'layers': [{'block': 'transformer', 'heads': 2, 'kv_groups': 1, 'ffn': 32, 'inner': 0}]}


def _entry(params, value, name):
  return {'metrics': {'params': params, name: value}, 'objectives': {name: value},
          'arch': _ARCH, 'latency_ms': None}


def _pareto(names, front=(), largest=9e5, budget=None):
  name = names[0]
  return {'objectives': names, 'maximize': [name == 'wpca'], 'strategy': 'ga', 'pop_size': 4,
          'n_children': 4, 'generations': 1, 'n_evals': 4, 'search_seconds': 1.0,
          'archs_per_second': 4.0, 'budgets': {'params': budget} if budget else {}, 'seed': 0,
          'supernet_step': None, 'ref_point': [0.0], 'hypervolume': 1.0,
          'hypervolume_random_initial': 0.5, 'latency_batch': [1, 8], 'device': 'cpu',
          'eval_tokens': 8, 'random': [],
          'front': [dict(index=i, **_entry(p, v, name)) for i, (p, v) in enumerate(front)],
          'baselines': {'smallest': _entry(1e5, 1.0, name),
                        'largest': _entry(largest, 9.0, name)}}


def test_wpca_plot_budget_line_no_stretch_no_hypervolume_readable_labels():
  import matplotlib.pyplot as plt

  from elastic_jax.search import report
  # Ten members crowded near one point, two apart: labels must not pile up.
  front = [(2.0e5 + i * 10, 5.0 + i * 1e-4) for i in range(10)] + [(2.5e5, 6.0), (2.9e5, 7.0)]
  fig = report.pareto_figure(_pareto(['wpca'], front, largest=9e5, budget=3e5))
  ax = fig.axes[0]
  assert 'hypervolume' not in ax.get_title()
  lo, hi = ax.get_xlim()
  assert hi < 0.9 and hi > 0.3  # the 0.9M largest does not stretch the axis; the budget shows
  vertical = [l for l in ax.get_lines() if len(set(l.get_xdata())) == 1]
  assert any(np.isclose(l.get_xdata()[0], 0.3) for l in vertical)
  labels = [t for t in ax.texts]
  assert 3 <= len(labels) < 12
  legend = ' '.join(t.get_text() for t in ax.get_legend().get_texts())
  assert 'outside the budget' in legend and 'budget: params' in legend
  plt.close(fig)
  fig = report.pareto_figure(_pareto(['loss', 'params'], [(2e5, 5.0), (3e5, 4.0)]))
  assert 'hypervolume' in fig.axes[0].get_title()
  plt.close(fig)


def test_training_writes_a_training_curve(trained):
  from elastic_jax.train import curves
  work, _, _ = trained
  png = work / 'training.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  expected = {}
  for line in (work / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    for key in ('train/largest/ce', 'train/smallest/ce', 'eval/largest/loss',
                'eval/smallest/loss'):
      if key in record:
        expected.setdefault(key, []).append((record['step'], record[key]))
  series = curves.training_series(work)
  assert set(series) == {'train/largest', 'train/smallest', 'eval/largest', 'eval/smallest'}
  for key, points in expected.items():
    name = '/'.join(key.split('/')[:2])
    assert list(zip(*series[name])) == points
  assert len(series['train/largest'][0]) == 4  # log_every=1, 4 steps


# -- 9. files follow the umask -------------------------------------------------------------


@pytest.mark.parametrize('umask', [0o022, 0o002])
def test_outputs_follow_the_umask(trained, tmp_path, umask):
  from elastic_jax import atomic
  work, arch, _ = trained
  old = os.umask(umask)
  try:
    out = tmp_path / 'dense'
    assert run('export', f'--workdir={work}', f'--arch={arch}', f'--out={out}')[0] == 0
    atomic.write_text(tmp_path / 'x.json', '{}')
    atomic.write_bytes(tmp_path / 'y.bin', b'1')
    atomic.write_file(tmp_path / 'z.txt', lambda p: p.write_text('z'))
  finally:
    os.umask(old)
  mode = lambda p: stat.S_IMODE(p.stat().st_mode)
  assert mode(out) == 0o777 & ~umask
  for f in [*out.iterdir(), tmp_path / 'x.json', tmp_path / 'y.bin', tmp_path / 'z.txt']:
    assert mode(f) == 0o666 & ~umask, f
  current = os.umask(0)
  os.umask(current)
  assert mode(work / 'config.json') == 0o666 & ~current  # was 0600 (mkstemp)


# -- 10. failed runs leave nothing behind --------------------------------------------------


def test_a_diverging_run_leaves_no_workdir(cache, tmp_path):
  work = tmp_path / 'w'
  assert_one_line_exit_2(run('train', QUICK, cache, f'--workdir={work}',
                             '--config.train.learning_rate=1e30', '--config.train.steps=3',
                             '--config.train.warmup_steps=0', '--config.train.checkpoint_every=3'),
                         'diverged')
  assert not work.exists()


def test_a_failed_run_keeps_what_was_there(cache, tmp_path):
  work = tmp_path / 'w'
  work.mkdir()
  (work / 'notes.txt').write_text('mine')
  assert_one_line_exit_2(run('search', QUICK, cache, f'--workdir={work}'), 'no trained supernet')
  assert sorted(p.name for p in work.iterdir()) == ['notes.txt']
