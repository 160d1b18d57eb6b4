"""GLUE examples as a fine-tuned model reads them, encoded once into arrays.

Encoders: [CLS] A [SEP] (B [SEP]) with token types 0 / 1 (the data pipeline's `GlueEncoder`, the
layout BERT's tokenizer makes). Decoders: A [EOS] (B [EOS]), no token types; the classifier pools
the last real token, which has seen the whole input.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from elastic_jax import data
from elastic_jax.data import sources
from elastic_jax.data.config import DataConfig
from elastic_jax.data.glue_tasks import GlueTask
from elastic_jax.data.pipelines import GlueEncoder, truncate_pair
from elastic_jax.data.tokenizer import Tokenizer
from elastic_jax.errors import UserError


def open_task(glue: str, task: GlueTask, cache_dir: str = '') -> sources.Corpus:
  """The task's splits: `glue` is a GLUE directory (TSV files) or 'tfds' (tfds:glue, online)."""
  cfg = data.default_config()
  cfg.task = 'glue'
  cfg.cache_dir = cache_dir
  if glue == 'tfds':
    cfg.source = f'tfds:glue/{task.tfds_name}'
  else:
    cfg.source, cfg.glue_dir, cfg.glue_task = 'glue', glue, task.name
  return sources.open_corpus(DataConfig.from_config(cfg))


@dataclasses.dataclass(frozen=True)
class DecoderPairEncoder:
  """record -> A [eos] (B [eos]), right-padded; pairs truncated longest-first."""

  tokenizer: Tokenizer
  reader: sources.GlueRecords
  seq_len: int
  task: GlueTask

  def __call__(self, record) -> dict:
    sentence1, sentence2, label = self.reader(record)
    tok = self.tokenizer
    first = tok.encode_array(sentence1)
    if self.task.is_pair:
      second = tok.encode_array(sentence2)
      len1, len2 = truncate_pair(len(first), len(second), self.seq_len - 2)
      ids = np.concatenate([first[:len1], [tok.eos_id], second[:len2], [tok.eos_id]])
    else:
      ids = np.concatenate([first[:self.seq_len - 1], [tok.eos_id]])
    n = len(ids)
    tokens = np.full(self.seq_len, tok.pad_id, np.int32)
    tokens[:n] = ids
    segment_ids = (np.arange(self.seq_len) < n).astype(np.int32)
    positions = np.where(segment_ids > 0, np.arange(self.seq_len), 0).astype(np.int32)
    label = np.float32(label) if self.task.is_regression else np.int32(label)
    return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions,
            'token_types': np.zeros(self.seq_len, np.int32), 'label': label}


def check_tokenizer(tokenizer: Tokenizer, kind: str, vocab_size: int) -> None:
  """The special tokens the encoding uses must be ids of the model."""
  roles = ('cls', 'sep', 'pad') if kind == 'encoder' else ('eos', 'pad')
  for role in roles:
    i = getattr(tokenizer, f'{role}_id')
    if not 0 <= i < vocab_size:
      raise UserError(f'the tokenizer has no {role} token the model knows (id {i} >= vocab size '
                      f'{vocab_size}); fine-tune with the tokenizer the model was trained with')


def encode_split(records, reader, tokenizer: Tokenizer, task: GlueTask, kind: str,
                 seq_len: int, limit: int = 0) -> dict[str, np.ndarray]:
  """Every record of a split (the first `limit` if > 0) as stacked arrays [N, seq_len]."""
  encoder_cls = GlueEncoder if kind == 'encoder' else DecoderPairEncoder
  encode = encoder_cls(tokenizer=tokenizer, reader=reader, seq_len=seq_len, task=task)
  n = len(records) if not limit else min(limit, len(records))
  examples = [encode(records[i]) for i in range(n)]
  if not examples:
    raise UserError(f'GLUE {task.name}: a split has no examples')
  keys = ('tokens', 'segment_ids', 'positions', 'token_types', 'label')
  return {k: np.stack([e[k] for e in examples]) for k in keys}
