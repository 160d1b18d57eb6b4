"""Helpers for the data tests, built on the root conftest's `shared_data` and `data_cache`.

Plain functions rather than fixtures in a tests/data/conftest.py: the root conftest is imported by
the name `conftest`, and a second conftest.py here would shadow it.
"""

from pathlib import Path

import pytest

import elastic_jax.data as data


def shakespeare(shared_data: Path) -> Path:
  path = shared_data / 'tinyshakespeare' / 'input.txt'
  if not path.is_file():
    pytest.skip(f'{path} not found (set ELASTIC_JAX_SHARED_DATA to the shared data folder)')
  return path


def glue_dir(shared_data: Path) -> Path:
  path = shared_data / 'glue'
  if not path.is_dir():
    pytest.skip(f'{path} not found (set ELASTIC_JAX_SHARED_DATA to the shared data folder)')
  return path


def shakespeare_config(shared_data: Path, cache: Path):
  """A small causal-LM config over tinyshakespeare paragraphs; tests override what they need."""
  cfg = data.default_config()
  cfg.source = 'text_files'
  cfg.paths = [str(shakespeare(shared_data))]
  cfg.doc_boundary = 'blank_line'
  cfg.seq_len = 61
  cfg.batch_size = 6
  cfg.eval_batches = 3
  cfg.cache_dir = str(cache)
  return cfg
