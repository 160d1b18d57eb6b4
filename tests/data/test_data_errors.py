"""Bad input becomes one UserError line that says what is wrong and what to change."""

import pytest

import elastic_jax.data as data
from elastic_jax.errors import UserError


def _error(fn, cfg, **kwargs) -> str:
  with pytest.raises(UserError) as err:
    fn(cfg, **kwargs)
  message = str(err.value)
  assert message and '\n' not in message
  return message


def _text_cfg(tmp_path, paths, **extra):
  return {'source': 'text_files', 'paths': paths, 'cache_dir': str(tmp_path / 'cache'), **extra}


@pytest.mark.parametrize('fn', [data.train_iterator, data.eval_batches, data.describe])
def test_missing_path(tmp_path, fn):
  missing = str(tmp_path / 'nope.txt')
  assert missing in _error(fn, _text_cfg(tmp_path, [missing]))


def test_glob_without_match_and_directory(tmp_path):
  assert 'no file matches' in _error(data.describe, _text_cfg(tmp_path, [str(tmp_path / '*.md')]))
  assert 'is a directory' in _error(data.describe, _text_cfg(tmp_path, [str(tmp_path)]))


def test_empty_corpus(tmp_path):
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n   \n\t\n')
  assert 'has no text' in _error(data.train_iterator, _text_cfg(tmp_path, [str(empty)]))


def test_corpus_too_small_for_a_validation_split(tmp_path):
  small = tmp_path / 'small.txt'
  small.write_text('one short document\n')
  message = _error(data.describe, _text_cfg(tmp_path, [str(small)]))
  assert 'validation_fraction' in message
  no_validation = _text_cfg(tmp_path, [str(small)], validation_fraction=0.0)
  assert next(data.train_iterator(no_validation))['tokens'].shape == (32, 128)
  assert 'no validation data' in _error(data.eval_batches, no_validation)


@pytest.mark.parametrize('source', ['wikipedia', 'tfds:', 'tfds:no_such_dataset_for_elastic_jax'])
def test_unknown_dataset_name(tmp_path, source):
  message = _error(data.describe, {'source': source, 'tfds_data_dir': str(tmp_path)})
  assert source.removeprefix('tfds:') in message


def test_glue_wrong_columns_through_the_pipeline(tmp_path):
  task_dir = tmp_path / 'glue' / 'MRPC'
  task_dir.mkdir(parents=True)
  for name in ('train.tsv', 'dev.tsv'):
    (task_dir / name).write_text('label\tsentence1\tsentence2\n1\ta\tb\n')
  cfg = {'source': 'glue', 'task': 'glue', 'glue_dir': str(tmp_path / 'glue'),
         'glue_task': 'mrpc', 'cache_dir': str(tmp_path / 'cache')}
  message = _error(data.train_iterator, cfg)
  assert '#1 String' in message and 'train.tsv' in message


def test_glue_missing_dir_and_task(tmp_path):
  cfg = {'source': 'glue', 'task': 'glue', 'glue_dir': str(tmp_path / 'none'),
         'cache_dir': str(tmp_path / 'cache')}
  assert 'not a directory' in _error(data.describe, cfg)
  (tmp_path / 'glue').mkdir()
  cfg['glue_dir'] = str(tmp_path / 'glue')
  assert 'no SST-2/ folder' in _error(data.describe, cfg)
  cfg['glue_task'] = 'squad'
  assert 'unknown GLUE task' in _error(data.describe, cfg)


def test_more_processes_than_records(tmp_path):
  small = tmp_path / 'small.txt'
  small.write_text('a\nb\n')
  cfg = _text_cfg(tmp_path, [str(small)], doc_boundary='line', validation_fraction=0.0,
                  batch_size=4)
  assert 'fewer than the 4 processes' in _error(data.train_iterator, cfg, process_index=0,
                                                process_count=4)
