"""SQuAD questions as encoder windows: [CLS] question [SEP] context piece [SEP].

The standard recipe (BERT's run_squad): the question is cut to `max_query_len` tokens; a context
longer than what is left of `seq_len` is read through several windows starting `doc_stride`
tokens apart, so every context token is in at least one window. A token seen by several windows
belongs to the one where it has the most context on both sides ("max context"): only there may a
predicted answer start. Training labels are the answer's first and last tokens when the whole
answer lies in the window, else position 0 ([CLS], "no answer here").
"""

from __future__ import annotations

import dataclasses

import numpy as np

from elastic_jax.data.tokenizer import Tokenizer
from elastic_jax.errors import UserError
from elastic_jax.finetune.squad_data import Example


@dataclasses.dataclass(frozen=True)
class Windows:
  """Encoded windows of a list of examples.

  arrays: 'tokens', 'segment_ids', 'positions', 'token_types', 'start', 'end' (the labels),
    each [W, seq_len] or [W].
  example_index: int32[W], the example each window reads.
  context_index: int32[W, seq_len], the context token at each position, -1 outside the context.
  max_context: bool[W, seq_len], whether this window is the token's max-context window.
  offsets: per example, int32[n, 2] character offsets of its context tokens.
  """

  arrays: dict[str, np.ndarray]
  example_index: np.ndarray
  context_index: np.ndarray
  max_context: np.ndarray
  offsets: list[np.ndarray]


def spans(n_tokens: int, max_tokens: int, stride: int) -> list[tuple[int, int]]:
  """(start, length) of each window over `n_tokens` context tokens (one empty one if none)."""
  out, start = [], 0
  while True:
    length = min(n_tokens - start, max_tokens)
    out.append((start, length))
    if start + length >= n_tokens:
      return out
    start += min(length, stride)


def _max_context(doc_spans, position: int, index: int) -> bool:
  """Whether span `index` is the best of those holding `position`: the most context on its
  shorter side, ties to the longer span (BERT's _check_is_max_context)."""
  best, best_score = None, None
  for i, (start, length) in enumerate(doc_spans):
    end = start + length - 1
    if not start <= position <= end:
      continue
    score = min(position - start, end - position) + 0.01 * length
    if best_score is None or score > best_score:
      best, best_score = i, score
  return best == index


def answer_tokens(offsets: np.ndarray, start_char: int, text: str,
                  qid: str = '') -> tuple[int, int]:
  """First and last context token overlapping the answer's characters."""
  end_char = start_char + len(text)
  overlap = np.flatnonzero((offsets[:, 1] > start_char) & (offsets[:, 0] < end_char))
  if not len(overlap):
    raise UserError(f'question {qid!r}: the answer {text!r} at character {start_char} covers no '
                    'token of the context (blank?); fix or drop it')
  return int(overlap[0]), int(overlap[-1])


def encode(examples: list[Example], tokenizer: Tokenizer, seq_len: int, doc_stride: int,
           max_query_len: int) -> Windows:
  """Every window of every example (labels from each example's first answer)."""
  cls, sep, pad = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
  rows, example_index, context_index, max_context, all_offsets = [], [], [], [], []
  for e, ex in enumerate(examples):
    query = tokenizer.encode_array(ex.question)[:max_query_len]
    ids, offsets = tokenizer.encode_with_offsets(ex.context)
    all_offsets.append(offsets)
    max_tokens = seq_len - len(query) - 3
    if max_tokens < 1:
      raise UserError(f'finetune.seq_len {seq_len} leaves no room for the context after a '
                      f'{len(query)}-token question; raise seq_len or lower max_query_len')
    answer = (answer_tokens(offsets, ex.answers[0][1], ex.answers[0][0], ex.id) if ex.answers
              else None)
    doc_spans = spans(len(ids), max_tokens, doc_stride)
    first = len(query) + 2  # where the context starts in every window
    for w, (start, length) in enumerate(doc_spans):
      tokens = np.full(seq_len, pad, np.int32)
      n = first + length + 1
      tokens[:n] = np.concatenate([[cls], query, [sep], ids[start:start + length], [sep]])
      types = np.zeros(seq_len, np.int32)
      types[first:n] = 1
      segment_ids = (np.arange(seq_len) < n).astype(np.int32)
      where = np.full(seq_len, -1, np.int32)
      where[first:first + length] = np.arange(start, start + length)
      is_max = np.zeros(seq_len, bool)
      is_max[first:first + length] = [_max_context(doc_spans, p, w)
                                      for p in range(start, start + length)]
      label = (0, 0)
      if answer is not None and start <= answer[0] and answer[1] < start + length:
        label = (first + answer[0] - start, first + answer[1] - start)
      rows.append({'tokens': tokens, 'segment_ids': segment_ids,
                   'positions': np.where(segment_ids > 0, np.arange(seq_len), 0).astype(np.int32),
                   'token_types': types, 'start': np.int32(label[0]),
                   'end': np.int32(label[1])})
      example_index.append(e)
      context_index.append(where)
      max_context.append(is_max)
  arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  return Windows(arrays, np.asarray(example_index, np.int32), np.stack(context_index),
                 np.stack(max_context), all_offsets)
