"""GLUE examples as a fine-tuned model reads them, encoded once into arrays.

Encoders: [CLS] A [SEP] (B [SEP]) with token types 0 / 1 (the data pipeline's `GlueEncoder`, the
layout BERT's tokenizer makes). Decoders: A [EOS] (B [EOS]), no token types; the classifier pools
the last real token, which has seen the whole input.

Siamese pairs (`finetune.pair_encoding='siamese'`): each sentence of a pair encoded alone, as a
single-sentence task encodes it ([CLS] A [SEP] / A [EOS]), stacked as [N, 2, seq_len]: the
bi-encoder layout sentence-transformers trains and serves.
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
from elastic_jax.finetune.classifier import SEQUENCE_KEYS


def open_task(glue: str, task: GlueTask, cache_dir: str = '') -> sources.Corpus:
  """The task's splits: `glue` is a GLUE directory (TSV files) or 'tfds' (tfds:glue, online)."""
  cfg = data.default_config()
  cfg.task = 'glue'
  cfg.cache_dir = cache_dir
  if glue == 'tfds':
    cfg.source = f'tfds:glue/{task.tfds_name}'
  else:
    cfg.source, cfg.glue_dir, cfg.glue_task = 'glue', glue, task.name
  # The user set glue_dir as finetune.glue_dir: the messages name that field.
  return sources.open_corpus(DataConfig.from_config(cfg), glue_dir_field='finetune.glue_dir')


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


PAIR_ENCODINGS = ('cross', 'siamese')


def check_pair_encoding(pair_encoding: str) -> None:
  if pair_encoding not in PAIR_ENCODINGS:
    raise UserError(f'finetune.pair_encoding={pair_encoding!r} is unknown; use one of '
                    f'{", ".join(PAIR_ENCODINGS)}')


def encode_split(records, reader, tokenizer: Tokenizer, task: GlueTask, kind: str,
                 seq_len: int, limit: int = 0, pair_encoding: str = 'cross'
                 ) -> dict[str, np.ndarray]:
  """Every record of a split (the first `limit` if > 0) as stacked arrays: inputs [N, seq_len],
  or [N, 2, seq_len] for a pair task encoded 'siamese'; 'label' [N]."""
  check_pair_encoding(pair_encoding)
  encoder_cls = GlueEncoder if kind == 'encoder' else DecoderPairEncoder
  n = len(records) if not limit else min(limit, len(records))
  if n == 0:
    raise UserError(f'GLUE {task.name}: a split has no examples')
  if pair_encoding == 'cross' or not task.is_pair:
    encode = encoder_cls(tokenizer=tokenizer, reader=reader, seq_len=seq_len, task=task)
    examples = [encode(records[i]) for i in range(n)]
    return {k: np.stack([e[k] for e in examples]) for k in (*SEQUENCE_KEYS, 'label')}
  alone = dataclasses.replace(task, text_columns=task.text_columns[:1])
  halves = []
  for side in (0, 1):
    def read(record, side=side):
      *sentences, label = reader(record)
      return sentences[side], '', label
    encode = encoder_cls(tokenizer=tokenizer, reader=read, seq_len=seq_len, task=alone)
    halves.append([encode(records[i]) for i in range(n)])
  arrays = {k: np.stack([np.stack([a[k], b[k]]) for a, b in zip(*halves)]) for k in SEQUENCE_KEYS}
  arrays['label'] = np.stack([e['label'] for e in halves[0]])
  return arrays
