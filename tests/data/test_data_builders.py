"""The TFDS builders, built from ../shared/data into a temporary cache and read without TF."""

import sys

import data_testing
import numpy as np
import pytest

from elastic_jax.data import glue_tasks, sources
from elastic_jax.data.builders import glue_tsv, python_docs
from elastic_jax.data.config import DataConfig
from elastic_jax.errors import UserError

GLUE_DIRS = {'cola': 'CoLA', 'sst2': 'SST-2', 'mrpc': 'MRPC', 'rte': 'RTE', 'stsb': 'STS-B',
             'wnli': 'WNLI'}


def _tsv_rows(path, has_header):
  lines = [line for line in path.read_text(encoding='utf-8-sig').split('\n') if line.strip()]
  return lines[1:] if has_header else lines


def test_text_files_line_documents(shared_data, data_cache):
  shakespeare = data_testing.shakespeare(shared_data)
  cfg = DataConfig.from_config({'source': 'text_files', 'paths': [str(shakespeare)],
                                'doc_boundary': 'line', 'cache_dir': str(data_cache)})
  corpus = sources.open_corpus(cfg)
  lines = [line for line in shakespeare.read_text().split('\n') if line.strip()]
  train, validation = corpus.splits['train'], corpus.splits['validation']
  assert len(train) + len(validation) == len(lines)
  assert len(validation) == round(len(lines) * cfg.validation_fraction)
  texts = [corpus.reader(r)[0] for source in (train, validation)
           for r in source.__getitems__(list(range(len(source))))]
  assert sorted(texts) == sorted(lines)
  assert 'tensorflow' not in sys.modules  # Built and read without TensorFlow.


def test_text_files_single_file_is_cut_into_pieces(shared_data, data_cache):
  shakespeare = data_testing.shakespeare(shared_data)
  cfg = DataConfig.from_config({'source': 'text_files', 'paths': [str(shakespeare)],
                                'doc_boundary': 'file', 'cache_dir': str(data_cache)})
  corpus = sources.open_corpus(cfg)
  records = [r for source in (corpus.train, corpus.validation)
             for r in source.__getitems__(list(range(len(source))))]
  assert len(corpus.validation) >= 1
  texts = [corpus.reader(r) for r in records]
  assert sum(len(t) for t, _, _ in texts) == len(shakespeare.read_text())
  assert sum(bos for _, bos, _ in texts) == 1 and sum(eos for _, _, eos in texts) == 1


def test_second_open_reuses_the_build(shared_data, data_cache):
  shakespeare = data_testing.shakespeare(shared_data)
  cfg = DataConfig.from_config({'source': 'text_files', 'paths': [str(shakespeare)],
                                'doc_boundary': 'blank_line', 'cache_dir': str(data_cache)})
  first = sources.open_corpus(cfg)
  dataset_dir = data_cache / 'datasets' / 'text_files'
  built = sorted(p.name for p in dataset_dir.iterdir())
  second = sources.open_corpus(cfg)
  assert first.name == second.name and first.location == second.location
  assert sorted(p.name for p in dataset_dir.iterdir()) == built


@pytest.mark.parametrize('task', sorted(GLUE_DIRS))
def test_glue_tsv_rows_and_labels(task, shared_data, data_cache):
  glue_dir = data_testing.glue_dir(shared_data)
  spec = glue_tasks.get_task(task)
  cfg = DataConfig.from_config({'source': 'glue', 'task': 'glue', 'glue_dir': str(glue_dir),
                                'glue_task': task, 'cache_dir': str(data_cache)})
  corpus = sources.open_corpus(cfg)
  for split, file_name in (('train', 'train.tsv'), ('validation', 'dev.tsv')):
    rows = _tsv_rows(glue_dir / GLUE_DIRS[task] / file_name, spec.has_header)
    source = corpus.splits[split]
    assert len(source) == len(rows), (task, split)
    labels = np.asarray([source[i]['label'] for i in range(0, len(source), 7)])
    if spec.is_regression:
      assert np.issubdtype(labels.dtype, np.floating) and labels.min() >= 0 and labels.max() <= 5
    else:
      assert set(labels.tolist()) <= set(range(spec.num_labels))
      assert len(set(labels.tolist())) == spec.num_labels  # Every class occurs.
    first, second, _ = corpus.reader(source[0])
    assert first and (bool(second) == spec.is_pair)


def test_glue_labels_follow_the_tsv(shared_data, data_cache):
  glue_dir = data_testing.glue_dir(shared_data)
  cfg = DataConfig.from_config({'source': 'glue', 'task': 'glue', 'glue_dir': str(glue_dir),
                                'glue_task': 'rte', 'cache_dir': str(data_cache)})
  corpus = sources.open_corpus(cfg)
  row = _tsv_rows(glue_dir / 'RTE' / 'train.tsv', True)[0].split('\t')
  sentence1, sentence2, label = corpus.reader(corpus.train[0])
  assert (sentence1, sentence2) == (row[1], row[2])
  assert glue_tasks.get_task('rte').label_names[label] == row[3]


def test_python_docs_corpus(data_cache):
  cfg = DataConfig.from_config({'cache_dir': str(data_cache)})
  corpus = sources.open_corpus(cfg)
  assert len(corpus.train) > 100 and len(corpus.validation) > 5
  records = corpus.train.__getitems__(list(range(len(corpus.train))))
  text = ''.join(corpus.reader(r)[0] for r in records)
  assert len(text) > 1_000_000
  assert 'Module json' in text and 'assert' in text
  assert 'environ({' not in text  # Signatures show no environment variables (cgi.parse).
  reopened = sources.open_corpus(cfg)
  assert reopened.name == corpus.name


def test_glue_wrong_columns(tmp_path, data_cache):
  task_dir = tmp_path / 'SST-2'
  task_dir.mkdir()
  (task_dir / 'train.tsv').write_text('text\tlabel\ngood movie\t1\n')
  (task_dir / 'dev.tsv').write_text('text\tlabel\nbad movie\t0\n')
  cfg = DataConfig.from_config({'source': 'glue', 'task': 'glue', 'glue_dir': str(tmp_path),
                                'glue_task': 'sst2', 'cache_dir': str(data_cache)})
  with pytest.raises(UserError, match=r"needs columns \['sentence', 'label'\]") as err:
    sources.open_corpus(cfg)
  assert '\n' not in str(err.value)


def test_glue_bad_row_and_label(tmp_path, data_cache):
  task_dir = tmp_path / 'CoLA'
  task_dir.mkdir()
  (task_dir / 'train.tsv').write_text('gj04\t1\t\tA sentence.\ngj04\t1\tA short row.\n')
  (task_dir / 'dev.tsv').write_text('gj04\t1\t\tA sentence.\n')
  cfg = {'source': 'glue', 'task': 'glue', 'glue_dir': str(tmp_path), 'glue_task': 'cola',
         'cache_dir': str(data_cache)}
  with pytest.raises(UserError, match=r'train.tsv:2: expected 4 tab-separated columns'):
    sources.open_corpus(DataConfig.from_config(cfg))
  (task_dir / 'train.tsv').write_text('gj04\t7\t\tA sentence.\n')
  with pytest.raises(UserError, match="label '7' is not one of"):
    sources.open_corpus(DataConfig.from_config(cfg))


def test_glue_missing_task(shared_data, data_cache):
  glue_dir = data_testing.glue_dir(shared_data)
  cfg = DataConfig.from_config({'source': 'glue', 'task': 'glue', 'glue_dir': str(glue_dir),
                                'glue_task': 'qnli', 'cache_dir': str(data_cache)})
  with pytest.raises(UserError, match='no QNLI/ folder .* set data.glue_dir to'):
    sources.open_corpus(cfg)
  # Fine-tuning's glue_dir is finetune.glue_dir: the messages name the field the user set.
  with pytest.raises(UserError, match='no QNLI/ folder .* set finetune.glue_dir to'):
    sources.open_corpus(cfg, glue_dir_field='finetune.glue_dir')


def _tree(root) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob('*')) if root.exists() else []


def _sst2_dir(root, train: str):
  task_dir = root / 'SST-2'
  task_dir.mkdir(parents=True)
  (task_dir / 'train.tsv').write_text(train)
  (task_dir / 'dev.tsv').write_text('sentence\tlabel\nbad movie\t0\n')
  return task_dir


def test_a_failed_glue_build_removes_what_it_made_and_nothing_else(tmp_path):
  """A TSV with a bad label or wrong columns failed the build and left the dataset's folder
  (<cache>/datasets/glue_tsv/<task>-<key>/, and the folders above it) behind in the cache. Now the
  failed build removes what it created; a cache that was there before, another dataset's or a
  folder of the same dataset, stays as it was."""
  cache = tmp_path / 'cache'

  def config(task_dir):
    return DataConfig.from_config({'source': 'glue', 'task': 'glue',
                                   'glue_dir': str(task_dir.parent), 'glue_task': 'sst2',
                                   'cache_dir': str(cache)})

  bad_label = _sst2_dir(tmp_path / 'bad_label', 'sentence\tlabel\ngood movie\tmaybe\n')
  with pytest.raises(UserError, match="label 'maybe' is not one of"):
    sources.open_corpus(config(bad_label))
  assert _tree(cache / 'datasets') == [] and not (cache / 'datasets').exists()
  good = _sst2_dir(tmp_path / 'good', 'sentence\tlabel\ngood movie\t1\n')
  assert len(sources.open_corpus(config(good)).train) == 1
  wrong_columns = _sst2_dir(tmp_path / 'wrong_columns', 'text\tlabel\ngood movie\t1\n')
  name = glue_tsv.GlueTsvConfig(task=glue_tasks.get_task('sst2'), task_dir=wrong_columns).name
  earlier = cache / 'datasets' / 'glue_tsv' / name  # e.g. a build killed before this code ran
  earlier.mkdir()
  (earlier / 'notes.txt').write_text('kept')
  before = _tree(cache / 'datasets')
  with pytest.raises(UserError, match="needs columns"):
    sources.open_corpus(config(wrong_columns))
  assert _tree(cache / 'datasets') == before
  assert (earlier / 'notes.txt').read_text() == 'kept'
  assert len(sources.open_corpus(config(good)).train) == 1  # the built one, still whole


def test_tfds_catalog_name_reads_prepared_data(shared_data, data_cache):
  """'tfds:<name>' goes through tfds.data_source; a dataset already prepared needs no network."""
  shakespeare = data_testing.shakespeare(shared_data)
  built = sources.open_corpus(DataConfig.from_config(
      {'source': 'text_files', 'paths': [str(shakespeare)], 'doc_boundary': 'blank_line',
       'cache_dir': str(data_cache)}))
  cfg = DataConfig.from_config({'source': f'tfds:{built.name}',
                                'tfds_data_dir': str(data_cache / 'datasets')})
  corpus = sources.open_corpus(cfg)
  assert corpus.name == f'tfds/{built.name}' and corpus.validation_split == 'validation'
  assert len(corpus.train) == len(built.train)
  text, bos, eos = corpus.reader(corpus.train[0])
  assert text == built.reader(built.train[0])[0] and bos and eos
  wrong_key = DataConfig.from_config({'source': f'tfds:{built.name}', 'tfds_text_key': 'content',
                                      'tfds_data_dir': str(data_cache / 'datasets')})
  with pytest.raises(UserError, match="no feature 'content'"):
    sources.open_corpus(wrong_key)


def test_python_docs_text_is_deterministic():
  """The same text on every run and in every virtual environment of this Python: nothing in it
  names where the interpreter lives (platform.architecture's default executable did, and two
  venvs then trained different BPE tokenizers under one cache key)."""
  first = python_docs.collect_documents()
  assert first == python_docs.collect_documents()
  assert len(first) > 300 and all(title and text for title, text in first)
  text = '\n'.join(t for _, t in first)
  assert sys.executable not in text and sys.prefix not in text
