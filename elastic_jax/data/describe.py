"""A summary of the data a config selects, for the `elastic-jax data` command and for people."""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

from elastic_jax.data import pipelines, sources
from elastic_jax.data.config import DataConfig

# Splits larger than this are summarised from their first records (counts are then estimates):
# tokenizing all of lm1b or C4 to print a summary would take hours.
_MAX_RECORDS_COUNTED = 200_000


def describe(data_cfg: Any) -> dict[str, Any]:
  """Builds (or opens) the dataset and tokenizer and returns JSON-able facts about them."""
  cfg = DataConfig.from_config(data_cfg)
  corpus = sources.open_corpus(cfg)
  pipelines.check_task(cfg, corpus)
  tokenizer = pipelines.tokenizer_for(cfg, corpus)
  summary: dict[str, Any] = {
      'source': cfg.source,
      'dataset': corpus.name,
      'location': corpus.location,
      'task': cfg.task,
      'tokenizer': tokenizer.describe(),
      'seq_len': cfg.seq_len,
      'batch_size': cfg.batch_size,
      'validation_split': corpus.validation_split,
  }
  if corpus.kind == 'glue':
    task = corpus.glue_task
    summary['glue'] = {'task': task.name, 'num_labels': task.num_labels, 'metric': task.metric,
                       'is_regression': task.is_regression, 'label_names': list(task.label_names)}
    encoder = pipelines.GlueEncoder(tokenizer, corpus.reader, cfg.seq_len, task)
    splits = {name: _glue_split(source, corpus.reader, encoder, cfg.seq_len)
              for name, source in corpus.splits.items()}
    units_per_eval_batch = cfg.batch_size  # examples
    eval_units = splits[corpus.validation_split]['records'] if corpus.validation_split else 0
  else:
    framer = pipelines.LmFramer(tokenizer, corpus.reader, cfg.task == 'causal_lm')
    splits = {name: _lm_split(source, framer) for name, source in corpus.splits.items()}
    units_per_eval_batch = cfg.batch_size * cfg.seq_len  # tokens
    eval_units = splits[corpus.validation_split]['tokens'] if corpus.validation_split else 0
  summary['splits'] = splits
  available = math.ceil(eval_units / units_per_eval_batch)
  summary['eval_batches'] = {'configured': cfg.eval_batches,
                             'used': min(available, cfg.eval_batches or available),
                             'available': available}
  return summary


def _counted(source: Any) -> tuple[int, int]:
  """(records in the split, records counted)."""
  total = len(source)
  return total, min(total, _MAX_RECORDS_COUNTED)


def _lm_split(source: Any, framer: pipelines.LmFramer) -> dict[str, Any]:
  total, counted = _counted(source)
  tokens = chars = 0
  read = pipelines.ReadRecords(source, lambda record: record)
  for start in range(0, counted, 1024):
    for record in read(np.arange(start, min(start + 1024, counted))):
      chars += len(framer.reader(record)[0])
      tokens += len(framer(record)['tokens'])  # = targets per document, bos/eos framing included
  scale = total / counted if counted else 0.0
  return {'records': total, 'tokens': round(tokens * scale), 'chars': round(chars * scale),
          'estimated': counted < total, 'counted_records': counted}


def _glue_split(source: Any, reader: sources.GlueRecords, encoder: pipelines.GlueEncoder,
                seq_len: int) -> dict[str, Any]:
  total, counted = _counted(source)
  tokens = truncated = 0
  labels: collections.Counter = collections.Counter()
  values = []
  read = pipelines.ReadRecords(source, lambda record: record)
  for start in range(0, counted, 1024):
    for record in read(np.arange(start, min(start + 1024, counted))):
      sentence1, sentence2, label = reader(record)
      tok = encoder.tokenizer
      length = len(tok.encode_array(sentence1)) + 2  # [cls] A [sep]
      if encoder.task.is_pair:
        length += len(tok.encode_array(sentence2)) + 1  # B [sep]
      tokens += min(length, seq_len)
      truncated += length > seq_len
      if encoder.task.is_regression:
        values.append(float(label))
      else:
        labels[int(label)] += 1
  scale = total / counted if counted else 0.0
  # Token and truncation counts are scaled to the split; label statistics are of counted records.
  summary: dict[str, Any] = {'records': total, 'tokens': round(tokens * scale),
                             'truncated': round(truncated * scale), 'estimated': counted < total,
                             'counted_records': counted}
  if encoder.task.is_regression:
    real = np.asarray([v for v in values if v != -1.0])
    summary['label_mean'] = float(real.mean()) if real.size else None
    summary['label_std'] = float(real.std()) if real.size else None
  else:
    summary['label_counts'] = {str(k): v for k, v in sorted(labels.items())}
  return summary
