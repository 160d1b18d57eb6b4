"""grain pipelines: the training stream and the fixed evaluation batches for each task.

Training stream, per data shard (one per process unless `data.num_shards` says otherwise; a
process concatenates the rows of its shards):
  record indices -> this shard (records s, s+S, ...) -> shuffle, reshuffled every epoch
  -> repeat forever -> read records in chunks from array_record -> tokenize and frame each
  document -> pack into rows (causal LM, MLM) -> batch -> mask (MLM).
Every step is index-based or carries its position in its iterator state, so the stream is a
function of (config, seed, shard) and a restored iterator state resumes it exactly.

Batches are dicts of numpy arrays, rows = batch_size // process_count, L = seq_len:
  causal_lm / mlm: tokens int32[rows, L] (model input), targets int32[rows, L] (what to predict at
    each position; causal LM: the next token, already shifted), weights float32[rows, L] (loss
    weight), segment_ids int32[rows, L] (1, 2, ... per packed document, 0 = padding), positions
    int32[rows, L] (position within its document piece); mlm with data.mlm_max_predictions = P
    also mlm_positions int32[rows, P] (the predicted positions in order, then -1).
  glue: tokens, segment_ids (1 real, 0 pad), positions, token_types (0 = [CLS] A [SEP],
    1 = B [SEP]) int32[rows, L]; label int32[rows] (float32 for regression); weights
    float32[rows] (1 = real example, 0 = padding row of the last evaluation batch).

Causal LM framing: each document is [bos] text [eos]; inputs are all but the last token and
targets all but the first, so every token of a document, eos included, is predicted exactly once
from within its own document and no target ever crosses a document boundary: weights are 1 at
every real token and 0 only at padding. Document pieces that do not start/end their document get
no bos/eos (see documents.py). MLM framing is [cls] text [sep], as BERT-style fine-tuning expects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np
from absl import flags

from elastic_jax.data import sources
from elastic_jax.data.config import DataConfig
from elastic_jax.data.glue_tasks import GlueTask
from elastic_jax.data.masking import MlmMasker
from elastic_jax.data.packing import PackIterDataset
from elastic_jax.data.tokenizer import Tokenizer, bpe_tokenizer, load_tokenizer
from elastic_jax.errors import UserError

_EVAL_STREAM = 0  # mask stream of evaluation batches; training data shard s uses 1 + s
# Records are read and tokenized in the consuming thread: on a 2-core machine grain's thread pool
# costs more (GIL hand-offs, polling a prefetch buffer) than it overlaps. Documents are read in
# chunks because array_record's batched reads are ~4x faster per record than single ones.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_DOCS_PER_READ = 64


@dataclasses.dataclass(frozen=True)
class ReadRecords:
  """int[n] record indices -> [transform(record) for each], read with one batched lookup."""

  source: Any
  transform: Any

  def __call__(self, indices: np.ndarray) -> list[Any]:
    indices = [int(i) for i in indices]
    if hasattr(self.source, '__getitems__'):
      records = self.source.__getitems__(indices)
    else:
      records = [self.source[i] for i in indices]
    return [self.transform(record) for record in records]


@dataclasses.dataclass(frozen=True)
class LmFramer:
  """record -> {'tokens': int32[n]} (mlm) or {'tokens', 'targets': int32[n]} (causal LM)."""

  tokenizer: Tokenizer
  reader: sources.LmRecords
  causal: bool

  def __call__(self, record: Any) -> dict[str, np.ndarray]:
    text, bos, eos = self.reader(record)
    tok = self.tokenizer
    start, end = (tok.bos_id, tok.eos_id) if self.causal else (tok.cls_id, tok.sep_id)
    ids = tok.encode_array(text)
    seq = np.concatenate([[start] if bos else [], ids, [end] if eos else []]).astype(np.int32)
    if self.causal:
      if len(seq) < 2:  # Nothing to predict.
        return {'tokens': seq[:0], 'targets': seq[:0]}
      return {'tokens': seq[:-1], 'targets': seq[1:]}
    return {'tokens': seq}


@dataclasses.dataclass(frozen=True)
class GlueEncoder:
  """record -> one padded example: [cls] A [sep] (B [sep]), pairs truncated longest-first."""

  tokenizer: Tokenizer
  reader: sources.GlueRecords
  seq_len: int
  task: GlueTask

  def __call__(self, record: Any) -> dict[str, Any]:
    sentence1, sentence2, label = self.reader(record)
    tok = self.tokenizer
    first = tok.encode_array(sentence1)
    second = tok.encode_array(sentence2) if self.task.is_pair else None
    if second is None:
      first = first[:self.seq_len - 2]
      parts = [[tok.cls_id], first, [tok.sep_id]]
      types = [np.zeros(len(first) + 2, np.int32)]
    else:
      len1, len2 = truncate_pair(len(first), len(second), self.seq_len - 3)
      first, second = first[:len1], second[:len2]
      parts = [[tok.cls_id], first, [tok.sep_id], second, [tok.sep_id]]
      types = [np.zeros(len1 + 2, np.int32), np.ones(len2 + 1, np.int32)]
    ids = np.concatenate(parts).astype(np.int32)
    n = len(ids)
    tokens = np.full(self.seq_len, tok.pad_id, np.int32)
    tokens[:n] = ids
    token_types = np.zeros(self.seq_len, np.int32)
    token_types[:n] = np.concatenate(types)
    segment_ids = np.zeros(self.seq_len, np.int32)
    segment_ids[:n] = 1
    positions = np.zeros(self.seq_len, np.int32)
    positions[:n] = np.arange(n, dtype=np.int32)
    label = np.float32(label) if self.task.is_regression else np.int32(label)
    return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions,
            'token_types': token_types, 'label': label, 'weights': np.float32(1.0)}


def truncate_pair(len1: int, len2: int, budget: int) -> tuple[int, int]:
  """Longest-first truncation: drop tokens from the longer sentence until the pair fits.

  Closed form of the usual one-token-at-a-time loop (ties trim the second sentence).
  """
  if len1 + len2 <= budget:
    return len1, len2
  if len1 > len2:
    new1 = max(budget - len2, (budget + 1) // 2)
    return new1, min(len2, budget - new1)
  new2 = max(budget - len1, budget // 2)
  return min(len1, budget - new2), new2


def _causal_weights(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {**batch, 'weights': (batch['segment_ids'] > 0).astype(np.float32)}


def tokenizer_for(cfg: DataConfig, corpus: sources.Corpus) -> Tokenizer:
  """load_tokenizer, reusing the already opened corpus for a BPE."""
  return bpe_tokenizer(cfg, corpus) if cfg.tokenizer == 'bpe' else load_tokenizer(cfg)


def check_task(cfg: DataConfig, corpus: sources.Corpus) -> None:
  if (cfg.task == 'glue') != (corpus.kind == 'glue'):
    raise UserError(f"data.task {cfg.task!r} does not fit {corpus.name}, which holds "
                    f"{'GLUE examples' if corpus.kind == 'glue' else 'documents'}")


def record_indices(num_records: int, *, process_index: int = 0, process_count: int = 1,
                   shuffle: bool = False, seed: int = 0, repeat: bool = False) -> grain.MapDataset:
  """The order in which this process reads records: its shard, shuffled anew each epoch.

  Process p of P gets records p, p+P, ...: disjoint shards that together cover every record once
  per epoch. Shuffling happens within the shard, with grain's per-epoch reseeding.
  """
  indices = grain.MapDataset.range(num_records)[process_index::process_count]
  if shuffle:
    indices = indices.shuffle(seed=seed)
  return indices.repeat() if repeat else indices


def _pack_and_batch(indices: grain.MapDataset, cfg: DataConfig, tokenizer: Tokenizer,
                    corpus: sources.Corpus, source: Any, rows: int, *,
                    drop_remainder: bool) -> grain.IterDataset:
  """Record indices -> framed documents -> packed rows of seq_len -> batches of `rows`."""
  causal = cfg.task == 'causal_lm'
  framer = LmFramer(tokenizer, corpus.reader, causal)
  chunks = indices.batch(_DOCS_PER_READ).map(ReadRecords(source, framer))
  pad = tokenizer.pad_id
  pad_values = {'tokens': pad, 'targets': pad} if causal else {'tokens': pad}
  packed = PackIterDataset(chunks.to_iter_dataset(_READ_OPTIONS), seq_len=cfg.seq_len,
                           pad_values=pad_values)
  return packed.batch(rows, drop_remainder=drop_remainder)


def _glue_batches(indices: grain.MapDataset, cfg: DataConfig, tokenizer: Tokenizer,
                  corpus: sources.Corpus, source: Any, rows: int, *,
                  drop_remainder: bool) -> grain.IterDataset:
  encoder = GlueEncoder(tokenizer, corpus.reader, cfg.seq_len, corpus.glue_task)
  batches = indices.batch(rows, drop_remainder=drop_remainder)
  return batches.map(ReadRecords(source, encoder)).map(_stack).to_iter_dataset(_READ_OPTIONS)


def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def train_iterator(data_cfg: Any, *, process_index: int = 0, process_count: int = 1,
                   transform: Callable[[dict], dict] | None = None) -> ShardedIterator:
  """The endless, resumable training stream of this process.

  The global batch is split into `data.num_shards` shards (0 = one per process), each an
  independent stream of batch_size // num_shards rows over its own records: shard s of S reads
  records s, s+S, ... of the train split (disjoint shards that together cover every record once
  per epoch). Process p of P reads the consecutive shards p*S/P .. (p+1)*S/P - 1 and concatenates
  their rows. So with a fixed num_shards the global batch of every step (all processes' rows in
  process order) is the same for any process count that divides it.

  next() gives a batch (see the module docstring); get_state() gives a JSON-serialisable dict of
  this process's shards to store beside the model checkpoint (`merge_process_states` joins the
  processes' states into the run's, `process_state` takes one process's part back out), and
  set_state(state) on a freshly made iterator (same config, same shards) continues exactly where
  that state was taken.

  `transform`: an optional batch -> batch function applied last (e.g. SCONE's f-gram lookup,
  elastic_jax/scone/lookup.py); stateless, so it leaves the iterator state unchanged.
  """
  cfg = DataConfig.from_config(data_cfg)
  if not 0 <= process_index < process_count:
    raise UserError(f'process_index {process_index} is not in [0, process_count={process_count})')
  num_shards = cfg.num_shards or process_count
  # What the rows are split over: the processes, or the data shards the user set.
  parts = f'{num_shards} data shards' if cfg.num_shards else f'{num_shards} processes'
  if num_shards % process_count:
    raise UserError(f'data.num_shards={num_shards} is not a multiple of the {process_count} '
                    'processes; choose a multiple of every process count you will use')
  if cfg.batch_size % num_shards:
    raise UserError(f'data.batch_size {cfg.batch_size} is not divisible by the {parts}; make it '
                    f'a multiple of {num_shards}')
  corpus = sources.open_corpus(cfg)
  check_task(cfg, corpus)
  tokenizer = tokenizer_for(cfg, corpus)
  num_records = len(corpus.train)
  if num_records < num_shards:
    raise UserError(f'{corpus.name} has {num_records} training records, fewer than the {parts}; '
                    f'use more data or fewer {parts.split()[-1]}')
  per_process = num_shards // process_count
  shards = range(process_index * per_process, (process_index + 1) * per_process)
  return ShardedIterator(num_shards, {
      shard: _shard_stream(cfg, corpus, tokenizer, shard, num_shards, transform)
      for shard in shards})


def _shard_stream(cfg: DataConfig, corpus: sources.Corpus, tokenizer: Tokenizer, shard: int,
                  num_shards: int, transform=None) -> grain.DatasetIterator:
  """The stream of one data shard: batch_size // num_shards rows per batch."""
  rows = cfg.batch_size // num_shards
  indices = record_indices(len(corpus.train), process_index=shard, process_count=num_shards,
                           shuffle=cfg.shuffle, seed=cfg.seed, repeat=True)
  if cfg.task == 'glue':
    ds = _glue_batches(indices, cfg, tokenizer, corpus, corpus.train, rows, drop_remainder=True)
  else:
    ds = _pack_and_batch(indices, cfg, tokenizer, corpus, corpus.train, rows, drop_remainder=True)
    if cfg.task == 'causal_lm':
      ds = ds.map(_causal_weights)
    else:
      ds = ds.map_with_index(MlmMasker(tokenizer, cfg.mlm_probability, cfg.whole_word_mask,
                                       cfg.seed, stream=1 + shard,
                                       max_predictions=cfg.mlm_max_predictions))
  if transform is not None:
    ds = ds.map(transform)
  if cfg.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags (defaults suffice); a library caller outside an
      # absl app has not parsed any.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return iter(ds)


class ShardedIterator:
  """This process's data shards, read in step and concatenated row-wise (shard order)."""

  def __init__(self, num_shards: int, streams: dict[int, grain.DatasetIterator]):
    self.num_shards = num_shards
    self.streams = streams

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(stream) for stream in self.streams.values()]
    if len(parts) == 1:
      return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {'num_shards': self.num_shards,
            'shards': {str(s): stream.get_state() for s, stream in self.streams.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores the shards of this iterator from a state holding them (this process's own state
    or a whole run's from `merge_process_states`)."""
    saved = state.get('num_shards') if isinstance(state, dict) else None
    if saved != self.num_shards:
      raise UserError(f'the saved data position has {saved} data shards but this run reads '
                      f'{self.num_shards}; resume with the process count (or data.num_shards) '
                      'of the run that saved it, or set data.num_shards to a multiple of both')
    missing = [s for s in self.streams if str(s) not in state['shards']]
    if missing:
      raise UserError(f'the saved data position lacks data shards {missing}')
    for s, stream in self.streams.items():
      stream.set_state(state['shards'][str(s)])


def merge_process_states(states: list[dict[str, Any]]) -> dict[str, Any]:
  """The run's data position: every process's `get_state()` joined (all shards)."""
  counts = {s['num_shards'] for s in states}
  if len(counts) != 1:
    raise ValueError(f'processes read different numbers of data shards: {sorted(counts)}')
  shards = {}
  for s in states:
    shards.update(s['shards'])
  return {'num_shards': counts.pop(), 'shards': shards}


def process_state(run_state: dict[str, Any], process_index: int,
                  process_count: int) -> dict[str, Any]:
  """The part of a run's data position (`merge_process_states`) that process p of P reads."""
  num_shards = run_state['num_shards']
  if num_shards % process_count:
    raise UserError(f'cannot split the saved data position of {num_shards} data shards over '
                    f'{process_count} processes; use a process count dividing {num_shards}')
  per_process = num_shards // process_count
  keep = range(process_index * per_process, (process_index + 1) * per_process)
  return {'num_shards': num_shards,
          'shards': {str(s): run_state['shards'][str(s)] for s in keep}}


def eval_batches(data_cfg: Any,
                 transform: Callable[[dict], dict] | None = None) -> list[dict[str, np.ndarray]]:
  """The fixed evaluation set: `data.eval_batches` batches (0 = all) of the validation split.

  Read in stored order, unshuffled, with fixed MLM masks, at the global batch size: identical on
  every call and for any number of processes. Every batch has the full batch shape; the last one
  is padded if the split runs out (padding rows have segment_ids 0 and weights 0), and a split
  smaller than `eval_batches` batches gives fewer batches. `transform`: as in `train_iterator`.
  """
  cfg = DataConfig.from_config(data_cfg)
  corpus = sources.open_corpus(cfg)
  check_task(cfg, corpus)
  tokenizer = tokenizer_for(cfg, corpus)
  validation = corpus.validation
  indices = record_indices(len(validation))
  batcher = _glue_batches if cfg.task == 'glue' else _pack_and_batch
  ds = batcher(indices, cfg, tokenizer, corpus, validation, cfg.batch_size, drop_remainder=False)
  batches = []
  for batch in ds:
    batches.append(_pad_batch(batch, cfg.batch_size, tokenizer.pad_id))
    if len(batches) == cfg.eval_batches:
      break
  if cfg.task == 'causal_lm':
    batches = [_causal_weights(b) for b in batches]
  elif cfg.task == 'mlm':
    masker = MlmMasker(tokenizer, cfg.mlm_probability, cfg.whole_word_mask, cfg.seed,
                       stream=_EVAL_STREAM, max_predictions=cfg.mlm_max_predictions)
    batches = [masker(i, b) for i, b in enumerate(batches)]
  return batches if transform is None else [transform(b) for b in batches]


def train_documents(data_cfg: Any) -> Callable[[], Iterator[list[np.ndarray]]]:
  """The training split's documents as the model reads them (the `tokens` of each framed
  document), in stored order, `_DOCS_PER_READ` per chunk: `chunks()` streams them anew on every
  call, for corpus statistics such as SCONE's f-grams (elastic_jax/scone/fgrams.py)."""
  cfg = DataConfig.from_config(data_cfg)
  corpus = sources.open_corpus(cfg)
  check_task(cfg, corpus)
  tokenizer = tokenizer_for(cfg, corpus)
  read = ReadRecords(corpus.train, LmFramer(tokenizer, corpus.reader, cfg.task == 'causal_lm'))
  num = len(corpus.train)

  def chunks():
    for start in range(0, num, _DOCS_PER_READ):
      yield [d['tokens'] for d in read(np.arange(start, min(start + _DOCS_PER_READ, num)))]
  return chunks


def _pad_batch(batch: dict[str, np.ndarray], rows: int, pad_id: int) -> dict[str, np.ndarray]:
  """Pads a short last batch with rows that carry no tokens (segment_ids 0, weights 0)."""
  missing = rows - len(batch['tokens'])
  if missing == 0:
    return batch
  padded = {}
  for key, values in batch.items():
    fill = pad_id if key in ('tokens', 'targets') else 0
    extra = np.full((missing, *values.shape[1:]), fill, values.dtype)
    padded[key] = np.concatenate([values, extra])
  return padded
