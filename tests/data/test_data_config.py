"""The data config: every field documented, every bad value a UserError naming the field."""

import inspect
import re

import pytest

import elastic_jax.data as data
from elastic_jax.data import config as config_lib
from elastic_jax.errors import UserError


def test_every_field_is_commented():
  lines = inspect.getsource(config_lib.default_config).splitlines()
  fields = []
  for i, line in enumerate(lines):
    match = re.match(r'\s*c\.(\w+) = ', line)
    if match:
      fields.append(match.group(1))
      assert lines[i - 1].strip().startswith('#'), f'data.{match.group(1)} has no comment'
  assert set(fields) == set(data.default_config().keys())
  assert {f.name for f in config_lib.dataclasses.fields(data.DataConfig)} == set(fields)


def test_defaults_validate():
  cfg = data.DataConfig.from_config(data.default_config())
  assert cfg.source == 'python_docs' and cfg.tokenizer == 'bytes' and cfg.task == 'causal_lm'
  assert cfg.mlm_probability == 0.15 and cfg.num_workers == 0


def test_cache_dir_env(monkeypatch, tmp_path):
  monkeypatch.setenv('ELASTIC_JAX_CACHE', str(tmp_path / 'env'))
  assert data.DataConfig.from_config({}).cache_root() == tmp_path / 'env'
  explicit = data.DataConfig.from_config({'cache_dir': str(tmp_path / 'cfg')})
  assert explicit.cache_root() == tmp_path / 'cfg'


@pytest.mark.parametrize('override, field', [
    ({'source': 'wikipedia'}, 'data.source'),
    ({'task': 'translation'}, 'data.task'),
    ({'seq_len': 2}, 'data.seq_len'),
    ({'batch_size': 0}, 'data.batch_size'),
    ({'mlm_probability': 1.5}, 'data.mlm_probability'),
    ({'mlm_max_predictions': -1}, 'data.mlm_max_predictions'),
    ({'seq_len': 64, 'mlm_max_predictions': 65}, 'data.mlm_max_predictions'),
    ({'validation_fraction': 1.0}, 'data.validation_fraction'),
    ({'doc_boundary': 'sentence'}, 'data.doc_boundary'),
    ({'seed': -1}, 'data.seed'),
    ({'seq_len': '128'}, 'data.seq_len'),
    ({'tokenizer': 'bpe', 'bpe_vocab_size': 100}, 'data.bpe_vocab_size'),
    ({'source': 'text_files'}, 'data.paths'),
    ({'source': 'glue', 'task': 'glue'}, 'data.glue_dir'),
    ({'source': 'glue', 'glue_dir': '/x'}, 'data.task'),
    ({'task': 'glue'}, 'data.source'),
    ({'seq_lenght': 128}, 'data.seq_lenght'),
])
def test_bad_values_name_the_field(override, field):
  with pytest.raises(UserError) as err:
    data.DataConfig.from_config(override)
  message = str(err.value)
  assert field in message and '\n' not in message


def test_glue_task_info():
  assert data.glue_task_info('CoLA') == (2, 'matthews_corrcoef', False)
  assert data.glue_task_info('sst-2') == (2, 'accuracy', False)
  assert data.glue_task_info('STS-B') == (1, 'pearson', True)
  assert data.glue_task_info('mnli') == (3, 'accuracy', False)
  assert data.glue_task_info('mrpc')[1] == 'f1'
  with pytest.raises(UserError, match='unknown GLUE task'):
    data.glue_task_info('squad')
