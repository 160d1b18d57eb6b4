"""The `data` config section: the ConfigDict users edit, the validated dataclass the library reads.

Users and experiment files edit a `ml_collections.ConfigDict` (so it can be overridden from the
command line); the pipeline code reads a frozen `DataConfig` built from it once, so every bad value
is reported in one place with the name of the field to change.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from elastic_jax.errors import UserError

SOURCES = ('python_docs', 'text_files', 'glue')  # plus 'tfds:<catalog name>'
TASKS = ('causal_lm', 'mlm', 'glue')
DOC_BOUNDARIES = ('file', 'blank_line', 'line')
ENCODING_ERRORS = ('strict', 'replace', 'ignore')
TFDS_PREFIX = 'tfds:'
CACHE_ENV_VAR = 'ELASTIC_JAX_CACHE'


def default_cache_root() -> Path:
  """$ELASTIC_JAX_CACHE, else ~/.cache/elastic_jax: datasets, tokenizers, compiled programs."""
  return Path(os.environ.get(CACHE_ENV_VAR) or '~/.cache/elastic_jax').expanduser()


def default_config() -> ml_collections.ConfigDict:
  """Returns the `data` section of an experiment config, every field commented."""
  c = ml_collections.ConfigDict()
  # Where the text comes from:
  #   'python_docs'  the installed Python's own documentation (pydoc topics and standard-library
  #                  docstrings): exists offline on any machine with Python, so nothing to download.
  #   'text_files'   local plain-text files, see `paths` and `doc_boundary`.
  #   'glue'         a GLUE task directory of TSV files, see `glue_dir` and `glue_task`.
  #   'tfds:<name>'  any TFDS catalog dataset, e.g. 'tfds:lm1b', 'tfds:c4/en', 'tfds:glue/cola'
  #                  (downloaded and prepared by TFDS on first use; needs internet).
  c.source = 'python_docs'
  # text_files: files or glob patterns ('~' is expanded); matched files are read in sorted order.
  c.paths = ()
  # text_files: what one document is: 'file' (a whole file), 'blank_line' (paragraphs separated by
  # blank lines) or 'line' (every non-empty line). Packing keeps attention within a document.
  c.doc_boundary = 'file'
  # text_files: bytes that are not UTF-8: 'strict' (an error naming the file and byte offset),
  # 'replace' (read as U+FFFD) or 'ignore' (dropped).
  c.encoding_errors = 'strict'
  # glue: the GLUE data directory (holding CoLA/, SST-2/, ...) or one task's directory.
  c.glue_dir = ''
  # glue: task name: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli (case and '-' ignored).
  c.glue_task = 'sst2'
  # tfds:<name>: the feature holding the text of language-modelling datasets.
  c.tfds_text_key = 'text'
  # tfds:<name>: TFDS data directory; '' = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  c.tfds_data_dir = ''
  # python_docs / text_files: share of the documents held out as the fixed validation split.
  # (GLUE and TFDS datasets bring their own validation split.)
  c.validation_fraction = 0.05
  # What batches are for: 'causal_lm' (next-token prediction over packed documents), 'mlm'
  # (masked-token prediction over packed documents) or 'glue' (sentence (pair) classification or
  # regression; needs source 'glue' or 'tfds:glue/<task>').
  c.task = 'causal_lm'
  # 'bytes' (UTF-8 bytes, 262 ids, no training, lossless), 'bpe' (byte-level BPE trained on the
  # train split and cached), a Hugging Face tokenizer.json, or a directory containing one.
  c.tokenizer = 'bytes'
  # 'bpe': vocabulary size to train, special tokens included; model.vocab_size must be >= this.
  c.bpe_vocab_size = 8192
  # Tokens per row. Causal-LM rows hold `seq_len` inputs and their `seq_len` next-token targets.
  c.seq_len = 128
  # Rows per step across all processes; each process yields batch_size // process_count rows.
  c.batch_size = 32
  # Independent training streams the batch is split into (each batch_size // num_shards rows);
  # process p of P reads shards p*S/P .. (p+1)*S/P - 1. 0 = one per process. A fixed value (a
  # multiple of every process count you will use) makes the data order, and so the losses and a
  # resumed run, independent of the process count.
  c.num_shards = 0
  # mlm: share of real tokens selected for prediction (replaced 80% [MASK], 10% random, 10% kept).
  c.mlm_probability = 0.15
  # mlm: select whole words (all tokens of a word together) instead of single tokens.
  c.whole_word_mask = False
  # mlm: at most this many predicted tokens per row (BERT's max_predictions_per_seq; a row that
  # drew more keeps a random subset of this many; with whole_word_mask, of whole words, as BERT
  # does, so such a row may end a few below the cap). Batches then name their predicted positions
  # (`mlm_positions`), and training, evaluation and search form the [vocabulary] logits at those
  # positions only instead of at every one: the same losses, a fraction of the vocabulary's
  # work and memory (at seq_len 128 and 15%: 19 of 128 on average). 0 = no cap, logits at every
  # position.
  c.mlm_max_predictions = 0
  # How many fixed validation batches evaluation and search use; 0 = the whole validation split.
  c.eval_batches = 16
  # Where built datasets and trained tokenizers are cached; '' = $ELASTIC_JAX_CACHE, else
  # ~/.cache/elastic_jax. Builds are keyed by source and options, so a second run reuses them.
  c.cache_dir = ''
  # Seeds the shuffle and the masking: the stream is a function of (seed, step).
  c.seed = 0
  # Shuffle documents (or GLUE examples) with a new order each epoch; False keeps stored order.
  c.shuffle = True
  # grain worker processes for the training stream; 0 = in-process (deterministic across machines
  # of any size). The stream depends on this value: keep it fixed when resuming.
  c.num_workers = 0
  return c


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """A validated data config; see `default_config` for the meaning of each field."""

  source: str
  paths: tuple[str, ...]
  doc_boundary: str
  encoding_errors: str
  glue_dir: str
  glue_task: str
  tfds_text_key: str
  tfds_data_dir: str
  validation_fraction: float
  task: str
  tokenizer: str
  bpe_vocab_size: int
  seq_len: int
  batch_size: int
  num_shards: int
  mlm_probability: float
  whole_word_mask: bool
  mlm_max_predictions: int
  eval_batches: int
  cache_dir: str
  seed: int
  shuffle: bool
  num_workers: int

  @classmethod
  def from_config(cls, cfg: Any) -> DataConfig:
    """Validates a `data` ConfigDict (or mapping, or DataConfig); fields left out take defaults."""
    if isinstance(cfg, DataConfig):
      return cfg
    if isinstance(cfg, ml_collections.ConfigDict):
      values = cfg.to_dict()
    elif isinstance(cfg, Mapping):
      values = dict(cfg)
    else:
      raise UserError('the data config must be a ConfigDict or a mapping, got '
                      f'{type(cfg).__name__}')
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise UserError(f'data.{unknown[0]} is not a data config field; known fields: '
                      f'{", ".join(sorted(known))}')
    merged = default_config().to_dict()
    merged.update(values)
    merged['paths'] = _as_paths(merged['paths'])
    for name, kind in (('seed', int), ('seq_len', int), ('batch_size', int), ('num_shards', int),
                       ('bpe_vocab_size', int), ('eval_batches', int), ('num_workers', int),
                       ('mlm_max_predictions', int),
                       ('validation_fraction', float), ('mlm_probability', float),
                       ('whole_word_mask', bool), ('shuffle', bool)):
      merged[name] = _coerce(name, merged[name], kind)
    for name in ('source', 'doc_boundary', 'encoding_errors', 'glue_dir', 'glue_task',
                 'tfds_text_key', 'tfds_data_dir', 'task', 'tokenizer', 'cache_dir'):
      if not isinstance(merged[name], str):
        raise UserError(f'data.{name} must be a string, got {merged[name]!r}')
    config = cls(**merged)
    config._validate()
    return config

  @property
  def is_tfds(self) -> bool:
    return self.source.startswith(TFDS_PREFIX)

  @property
  def tfds_name(self) -> str:
    return self.source[len(TFDS_PREFIX):]

  def cache_root(self) -> Path:
    """The cache directory: data.cache_dir, else $ELASTIC_JAX_CACHE, else ~/.cache/elastic_jax."""
    return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_root()

  def _validate(self) -> None:
    if self.source not in SOURCES and not (self.is_tfds and self.tfds_name):
      raise UserError(f"data.source is {self.source!r}; use one of {', '.join(SOURCES)} or "
                      "'tfds:<catalog name>' (e.g. 'tfds:lm1b')")
    if self.task not in TASKS:
      raise UserError(f"data.task is {self.task!r}; use one of {', '.join(TASKS)}")
    is_glue_source = self.source == 'glue' or self.tfds_name.startswith('glue/')
    if self.task == 'glue' and not is_glue_source:
      raise UserError(f"data.task 'glue' needs data.source 'glue' or 'tfds:glue/<task>', "
                      f'got {self.source!r}')
    if is_glue_source and self.task != 'glue':
      raise UserError(f"data.source {self.source!r} holds labelled GLUE examples: set "
                      f"data.task='glue' (got {self.task!r})")
    if self.source == 'text_files' and not self.paths:
      raise UserError("data.source 'text_files' needs data.paths: a list of files or globs")
    if self.source == 'glue' and not self.glue_dir:
      raise UserError("data.source 'glue' needs data.glue_dir: the directory holding the GLUE "
                      'task folders (CoLA/, SST-2/, ...)')
    if self.doc_boundary not in DOC_BOUNDARIES:
      raise UserError(f"data.doc_boundary is {self.doc_boundary!r}; use one of "
                      f"{', '.join(DOC_BOUNDARIES)}")
    if self.encoding_errors not in ENCODING_ERRORS:
      raise UserError(f"data.encoding_errors is {self.encoding_errors!r}; use one of "
                      f"{', '.join(ENCODING_ERRORS)}")
    if not 0.0 <= self.validation_fraction < 1.0:
      raise UserError(f'data.validation_fraction must be in [0, 1), got {self.validation_fraction}')
    if not self.tokenizer:
      raise UserError("data.tokenizer is empty; use 'bytes', 'bpe' or a path to a tokenizer.json")
    if self.tokenizer == 'bpe' and self.bpe_vocab_size < 263:
      raise UserError('data.bpe_vocab_size must be at least 263 (256 bytes, 6 special tokens and '
                      f'one merge), got {self.bpe_vocab_size}')
    if self.seq_len < 4:
      raise UserError(f'data.seq_len must be at least 4, got {self.seq_len}')
    if self.batch_size < 1:
      raise UserError(f'data.batch_size must be a positive integer, got {self.batch_size}')
    if self.num_shards < 0:
      raise UserError(f'data.num_shards must be >= 0 (0 = one per process), got {self.num_shards}')
    if self.num_shards and self.batch_size % self.num_shards:
      raise UserError(f'data.batch_size {self.batch_size} is not divisible by data.num_shards='
                      f'{self.num_shards}; make it a multiple')
    if not 0.0 < self.mlm_probability < 1.0:
      raise UserError(f'data.mlm_probability must be in (0, 1), got {self.mlm_probability}')
    if not 0 <= self.mlm_max_predictions <= self.seq_len:
      raise UserError(f'data.mlm_max_predictions must be in [0, data.seq_len={self.seq_len}] '
                      f'(0 = no cap), got {self.mlm_max_predictions}')
    if self.eval_batches < 0:
      raise UserError(f'data.eval_batches must be >= 0 (0 = whole validation split), got '
                      f'{self.eval_batches}')
    if not 0 <= self.seed < 2**32:
      raise UserError(f'data.seed must be in [0, 2**32), got {self.seed}')
    if self.num_workers < 0:
      raise UserError(f'data.num_workers must be >= 0, got {self.num_workers}')


LM_TASKS = ('causal_lm', 'mlm')


def check_lm_task(data_cfg: Any) -> None:
  """Supernet training, evaluation and search model tokens: UserError for a GLUE task (a
  classification head fine-tuned on an exported model, not a supernet objective)."""
  task = data_cfg.task if isinstance(data_cfg, DataConfig) else dict(data_cfg).get('task')
  if task == 'glue':
    raise UserError("data.task='glue' is for fine-tuning an exported model on a GLUE task "
                    '(`elastic-jax finetune`, which a later version adds); supernet training, '
                    "evaluation and search need data.task 'causal_lm' or 'mlm'")
  DataConfig.from_config(data_cfg)


def _as_paths(value: Any) -> tuple[str, ...]:
  if isinstance(value, (str, os.PathLike)):
    value = [value]
  if not isinstance(value, (list, tuple)):
    raise UserError(f'data.paths must be a list of files or globs, got {value!r}')
  return tuple(os.fspath(p) for p in value)


def _coerce(name: str, value: Any, kind: type) -> Any:
  """Converts ints written as floats (and the like) without accepting nonsense such as '12'."""
  if kind is bool:
    if isinstance(value, bool):
      return value
  elif kind is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif kind is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  raise UserError(f'data.{name} must be {kind.__name__}, got {value!r}')
