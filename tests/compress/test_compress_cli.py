"""`elastic-jax sort` and `elastic-jax compress` end to end on a tiny random Llama, and the bad
inputs the issue names: one line on stderr, exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from elastic_jax import cli
from elastic_jax import export as export_lib
from elastic_jax.compress import job as compress_job
from elastic_jax.errors import UserError
from elastic_jax.hf import convert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'hf'))
H = pytest.importorskip('hf_testing')


def run(capsys, *args):
  code = cli.main(['elastic-jax', *args])
  out, err = capsys.readouterr()
  return code, out, err


def one_line_error(code, err) -> str:
  assert code == 2, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, err
  return lines[0]


@pytest.fixture
def imported(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('ELASTIC_JAX_CACHE', str(tmp_path / 'cache'))
  llama = H.save_model('llama', tmp_path / 'llama')
  w = tmp_path / 'W'
  code, _, err = run(capsys, 'import-hf', f'--model={llama}', f'--out={w}')
  assert code == 0, err
  return llama, w


def _set(w: Path, section: str, **values):
  cfg = json.loads((w / 'config.json').read_text())
  cfg.setdefault(section, {}).update(values)
  (w / 'config.json').write_text(json.dumps(cfg))


def test_sort_command_keeps_the_function_and_saves_scores(imported, capsys):
  llama, w = imported
  _set(w, 'data', seq_len=16, batch_size=4)
  _set(w, 'compress', calibration_batches=2, min_calibration_tokens=64)
  before, _ = export_lib.load(w / 'pretrained')
  code, out, err = run(capsys, 'sort', f'--workdir={w}')
  assert code == 0, err
  report = json.loads(out)
  assert report['tokens'] == 128 and sorted(report['layer_order']) == [0, 1, 2]
  scores = np.load(w / 'sort' / 'scores.npz')
  assert scores['hidden'].shape == (24,) and scores['heads_0'].shape == (6,)
  after, saved = export_lib.load(w / 'pretrained')
  assert saved['sorted']['method'] == 'activation'
  batch = H.ours(H.padded_batch('llama'))
  np.testing.assert_allclose(np.asarray(after(batch)), np.asarray(before(batch)), rtol=1e-5,
                             atol=1e-5)
  # transformers still reads the sorted original as the same model.
  code, _, err = run(capsys, 'export', f'--workdir={w}', '--arch=largest', '--format=hf',
                     f'--out={w.parent / "hf"}')
  assert code == 0, err
  b = H.padded_batch('llama')
  mask = np.asarray(b['attention_mask'], bool)
  assert H.max_scaled_diff(H.reference_logits(w.parent / 'hf', b),
                           H.reference_logits(llama, b), mask) <= 1e-5
  code, out, err = run(capsys, 'sort', f'--workdir={w}')  # done: nothing changes
  assert code == 0 and 'already sorted' in err


def test_too_few_calibration_tokens(imported, capsys):
  _, w = imported
  _set(w, 'compress', calibration_batches=1, min_calibration_tokens=10**6)
  line = one_line_error(*run(capsys, 'sort', f'--workdir={w}')[::2])
  assert 'calibration set has' in line and '1000000' in line
  assert not (w / 'sort').exists()


def test_budget_below_the_smallest_subnetwork_names_it(imported, capsys):
  llama, w = imported
  line = one_line_error(*run(capsys, 'compress', f'--model={llama}', f'--workdir={w}',
                             '--budgets=params=0.001')[::2])
  assert 'below the smallest sub-network' in line and 'parameters' in line
  smallest = int(line.split('(')[2].split(' parameters')[0].replace(',', ''))
  assert smallest > 0
  assert not (w / 'sort').exists()


def test_workdir_of_another_model_is_refused(imported, tmp_path, capsys):
  _, w = imported
  gpt2 = H.save_model('gpt2', tmp_path / 'gpt2')
  capsys.readouterr()  # transformers' progress bar
  line = one_line_error(*run(capsys, 'compress', f'--model={gpt2}', f'--workdir={w}')[::2])
  assert 'was imported from' in line and 'new workdir' in line


def test_bad_budget_spec(imported, capsys):
  llama, w = imported
  line = one_line_error(*run(capsys, 'compress', f'--model={llama}', f'--workdir={w}',
                             '--budgets=flops=3')[::2])
  assert 'params=' in line


@pytest.mark.slow
def test_compress_end_to_end_and_resume(tmp_path, monkeypatch):
  monkeypatch.setenv('ELASTIC_JAX_CACHE', str(tmp_path / 'cache'))
  llama = H.save_model('llama', tmp_path / 'llama')
  cfg = ml_collections.ConfigDict({
      'data': {'seq_len': 16, 'batch_size': 4, 'eval_batches': 2},
      'train': {'steps': 3, 'warmup_steps': 1, 'log_every': 3, 'eval_every': 0,
                'checkpoint_every': 3, 'learning_rate': 1e-3},
      'search': {'pop_size': 8, 'generations': 2, 'latency_max': 2},
      'compress': {'calibration_batches': 2, 'min_calibration_tokens': 64}})
  w = tmp_path / 'W'
  summary = compress_job.run_compress(llama, w, budgets='params=0.5', user_cfg=cfg,
                                      log=lambda m: None)
  entry = summary['budgets']['0.5']
  original = summary['original']['params']
  assert entry['search']['params'] <= 0.5 * original
  assert entry['pruned']['params'] <= entry['search']['params']
  assert entry['pruned_finetuned']['arch'] == entry['pruned']['arch']
  for key in ('hv_search', 'hv_pruning', 'hv_pruned_only'):
    assert summary[key] >= 0
  for name in ('summary.md', 'summary.json', 'front.png'):
    assert (w / 'compress' / name).is_file()
  # The hf export of the searched model computes what the native one does (transformers).
  native, _ = export_lib.load(w / 'compress' / 'models' / 'search_0.5')
  b = H.padded_batch('llama')
  mask = np.asarray(b['attention_mask'], bool)
  assert H.max_scaled_diff(convert.logits_reference(w / 'compress' / 'models' / 'search_0.5_hf',
                                                    b), np.asarray(native(H.ours(b))),
                           mask) <= 1e-4
  # The search started from the pruned model at the budget (compress.seed_search), so its pick
  # under the budget scores no worse than that model on the selection batches (the evaluation
  # module's loss of the pruned shape in the fine-tuned supernet).
  from elastic_jax import arch as arch_lib
  from elastic_jax import data, evaluation
  from elastic_jax.compress import pruning
  from elastic_jax.compress.sort import load_scores
  from elastic_jax.workdir import build_space, load_config, load_supernet
  wcfg = load_config(w)
  space = build_space(wcfg)
  pruned = pruning.PruningRule(space, load_scores(w)[1]['layer_order']).pick(
      entry['budget_params'])[0]
  seeds = (w / 'compress' / 'seed_archs.jsonl').read_text().splitlines()
  assert pruned in [json.loads(a) for a in seeds]
  # (a') / (b'): the rule's own model at the budget (not at the searched model's count), pruned
  # from the sorted original and fine-tuned alone like (b); its own files unless it is (a)'s shape.
  canonical = arch_lib.to_json(arch_lib.from_json(pruned, space.cfg))
  assert entry['budget_pruned']['arch'] == canonical == entry['budget_pruned_finetuned']['arch']
  assert entry['budget_pruned']['params'] <= entry['budget_params']
  same = entry['budget_pruned']['arch'] == entry['pruned']['arch']
  assert (entry['budget_pruned']['dir'] == entry['pruned']['dir']) == same
  assert summary['hv_budget_pruning'] >= 0
  assert wcfg.search.seed_archs.endswith('seed_archs.jsonl')
  # Fine-tuning (compress.sampling='anchored') trained one anchor at every step, beside
  # train.num_random sub-networks (default 2): among the uniform models of 85-100% of the
  # budget, one per width and the pruned model among them, the one whose loss with the sorted
  # original's weights is lowest. Checked against the dense export of each candidate, an
  # independent path to the masked population call that scored them.
  assert wcfg.train.sampling == 'anchored'
  anchors = (w / 'compress' / 'anchor_archs.jsonl').read_text().splitlines()
  report = json.loads((w / 'compress' / 'anchors.json').read_text())
  assert len(anchors) == 1 and len(report) == 1
  chosen, scored = json.loads(anchors[0]), report[0]['candidates']
  assert chosen == report[0]['chosen']['arch'] and json.loads(seeds[0]) == chosen
  assert pruned in [e['arch'] for e in scored] and len(scored) > 1
  assert all(0.85 * entry['budget_params'] <= e['params'] <= entry['budget_params']
             for e in scored)
  from elastic_jax.compress.job import original_model
  from elastic_jax.compress.sort import calibration_batches
  original = original_model(wcfg, space)
  calib = calibration_batches(wcfg, 2)
  dense_loss = [evaluation.evaluate(export_lib.export(original, space.cfg,
                                                      arch_lib.from_json(e['arch'], space.cfg)),
                                    calib)['loss'] for e in scored]
  np.testing.assert_allclose([e['loss'] for e in scored], dense_loss, rtol=1e-4)
  assert chosen == scored[int(np.argmin(dense_loss))]['arch']
  logged = [json.loads(l) for l in (w / 'metrics.jsonl').read_text().splitlines()]
  logged = [d for d in logged if 'loss' in d]
  assert logged and all({'train/anchor0/ce', 'train/random1/ce'} <= set(d) for d in logged)
  model = load_supernet(wcfg, str(w), space)[0]
  ref = evaluation.evaluate_population(model, data.eval_batches(wcfg.data),
                                       arch_lib.stack([arch_lib.from_json(pruned, space.cfg)]))
  front = json.loads((w / 'search' / 'pareto.json').read_text())['front']
  best = min(e['metrics']['loss'] for e in front
             if e['metrics']['params'] <= entry['budget_params'])
  assert best <= float(ref['loss'][0]) + 1e-5
  stages = json.loads((w / 'compress' / 'stages.json').read_text())
  assert set(stages) == set(compress_job.STAGES)
  again = compress_job.run_compress(llama, w, budgets='params=0.5', log=lambda m: None)
  assert again['budgets']['0.5']['search']['ppl'] == entry['search']['ppl']
  assert again['budgets']['0.5']['pruned_finetuned']['ppl'] == entry['pruned_finetuned']['ppl']



@pytest.mark.parametrize('spec, message', [
    ('params=nan', "'nan' must be a positive number"),
    ('params=inf', "'inf' must be a positive number"),
    ('params=1.5', "'1.5' is neither a fraction of the original (<= 1) nor a whole parameter"),
    ('params=0.5,0.5', 'params=0.5 asks for'),
    ('params=1e9', "is not below the original's"),
    ('params=1', "is not below the original's"),
    ('params=0.001', 'below the smallest sub-network'),
])
def test_bad_budgets_are_one_line_and_leave_no_workdir(imported, tmp_path, capsys, spec,
                                                       message):
  """Each was a traceback (nan, inf), a budget of 1 parameter (1.5), or a run that went on (a
  duplicate, a budget above the original); a budget the space cannot reach failed after the
  import and left a workdir behind."""
  llama, _ = imported
  fresh = tmp_path / 'fresh'
  line = one_line_error(*run(capsys, 'compress', f'--model={llama}', f'--workdir={fresh}',
                             f'--budgets={spec}')[::2])
  assert message in line, line
  assert not fresh.exists()


def test_sort_never_permutes_another_workdirs_original(imported, tmp_path, capsys):
  """A copied workdir's config names the first workdir's pretrained/ (train.init_from): sorting
  it permuted the first one's original in place."""
  import shutil
  _, w = imported
  copy = tmp_path / 'W2'
  shutil.copytree(w, copy)
  weights = (w / 'pretrained' / 'model.safetensors').read_bytes()
  line = one_line_error(*run(capsys, 'sort', f'--workdir={copy}')[::2])
  assert "is not" in line and "own imported model" in line and 'config.json' in line, line
  assert (w / 'pretrained' / 'model.safetensors').read_bytes() == weights
  assert not (w / 'sort').exists() and not (copy / 'sort').exists()


def _config_file(tmp_path: Path, compress: dict) -> str:
  """A --config file whose compress section holds `compress` (what an experiment file sets)."""
  path = tmp_path / 'compress_cfg.py'
  path.write_text('import ml_collections\n\n\ndef get_config(arg=None):\n'
                  f'  return ml_collections.ConfigDict({{"compress": {compress!r}}})\n')
  return str(path)


@pytest.mark.parametrize('values, message', [
    ({'teacher': 'bogus'},
     "config field compress.teacher='bogus' is invalid: accepted values are ['original', "
     "'in_place']"),
    ({'teacher': 'in_place'},
     "config field compress.teacher='in_place' is invalid: compress.sampling='anchored' trains "
     'no largest network'),
    ({'sampling': 'zz'}, "config field compress.sampling='zz' is invalid: accepted values are "
                         "['standard',"),
    ({'importance': 'foo'}, "config field compress.importance='foo' is invalid: accepted values "
                            "are ['activation', 'taylor']"),
    ({'layer_importance': 'x'}, "config field compress.layer_importance='x' is invalid: accepted "
                                "values are ['cosine', 'loss']"),
    ({'anchors': 'y'}, "config field compress.anchors='y' is invalid: accepted values are "
                       "['loss', 'pruning']"),
    ({'anchor_low': 2.0}, 'config field compress.anchor_low=2.0 is invalid: must lie in (0, 1]'),
    ({'anchor_candidates': 0},
     'config field compress.anchor_candidates=0 is invalid: must be >= 1'),
    ({'calibration_batches': 0},
     'config field compress.calibration_batches=0 is invalid: must be >= 1'),
    ({'latency_batch': 0}, 'config field compress.latency_batch=0 is invalid: must be >= 1'),
    ({'baselines': 'maybe'},
     "config field compress.baselines='maybe' is invalid: must be True or False (default True)"),
    ({'budgets': 'flops=3'}, "config field compress.budgets 'flops=3' is not understood"),
    ({'temperature': 2.0}, 'unknown config field(s) compress.temperature; known fields:'),
])
def test_bad_compress_values_are_one_line_before_the_import(tmp_path, capsys, monkeypatch, values,
                                                            message):
  """Each was found only after the import (and most after the sort as well); a bogus teacher was
  reported as a sampling problem, an unknown field, a latency batch of 0 or a non-boolean
  `baselines` ran on (or failed with a traceback)."""
  from elastic_jax.hf import importer

  def no_import(*args, **kwargs):
    raise AssertionError('the checkpoint was imported before the config was checked')

  monkeypatch.setattr(importer, 'import_workdir', no_import)
  llama = H.save_model('llama', tmp_path / 'llama')
  capsys.readouterr()  # transformers' progress bar
  w = tmp_path / 'W'
  line = one_line_error(*run(capsys, 'compress', f'--model={llama}', f'--workdir={w}',
                             f'--config={_config_file(tmp_path, values)}')[::2])
  assert line.startswith(f'elastic-jax compress: error: {message}'), line
  assert not w.exists()


def test_a_resumed_workdirs_compress_values_are_checked_before_the_sort(imported, capsys,
                                                                        monkeypatch):
  """Rerun on an imported workdir, compress reads W/config.json: its values are checked before
  the sort stage (which scored the calibration set before the bad teacher was noticed)."""
  _, w = imported
  _set(w, 'compress', teacher='bogus')

  def no_sort(*args, **kwargs):
    raise AssertionError('the sort ran before the config was checked')

  monkeypatch.setattr(compress_job, 'run_sort', no_sort)
  line = one_line_error(*run(capsys, 'compress', f'--workdir={w}')[::2])
  assert "compress.teacher='bogus' is invalid: accepted values are ['original', 'in_place']" \
      in line, line


def test_unreadable_pretrained_advises_a_new_import_not_an_export(imported, tmp_path, capsys):
  """W/pretrained is written by the import: export.load's advice to re-export it was wrong,
  whether the sort or a later stage (here the anchors' choice, through train.init_from) reads
  it. An exported model's own files keep the advice to export again."""
  import shutil
  llama, w = imported
  _set(w, 'data', seq_len=16, batch_size=4)
  _set(w, 'compress', calibration_batches=2, min_calibration_tokens=64)
  exported = tmp_path / 'exported'
  shutil.copytree(w / 'pretrained', exported)
  weights = w / 'pretrained' / 'model.safetensors'
  good = weights.read_bytes()
  weights.write_bytes(good[:100])
  line = one_line_error(*run(capsys, 'sort', f'--workdir={w}')[::2])
  assert 'is corrupt or truncated' in line and 're-export' not in line, line
  assert f'import it again, into a new workdir (`elastic-jax compress --model={llama}' in line
  assert f'`elastic-jax import-hf --model={llama} --out=NEW_W`' in line
  weights.write_bytes(good)
  code, _, err = run(capsys, 'sort', f'--workdir={w}')
  assert code == 0, err
  config = w / 'pretrained' / 'config.json'
  config.write_text('{"format": ')
  code, _, err = run(capsys, 'compress', f'--workdir={w}', '--budgets=params=0.5')
  line = err.strip().splitlines()[-1]  # after the stages' progress lines
  assert code == 2 and line.startswith('elastic-jax compress: error: '), err
  assert f'{config} is not valid JSON' in line and 're-export' not in err, line
  assert f'compress --model={llama} --workdir=NEW_W' in line
  (exported / 'model.safetensors').write_bytes(good[:100])
  with pytest.raises(UserError, match='is corrupt or truncated .*; re-export the model$'):
    export_lib.load(exported)
