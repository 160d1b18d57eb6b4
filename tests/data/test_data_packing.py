"""Packing: rows full except the last, correct segment ids and positions, exact JSON resume."""

import json

import data_testing
import grain
import numpy as np
import pytest

import elastic_jax.data as data
from elastic_jax.data import sources
from elastic_jax.data.packing import PackIterDataset

SEQ_LEN = 11
DOC_LENGTHS = [3, 11, 29, 1, 0, 5, 13, 2, 7, 17, 1, 4]


def _docs():
  return [{'tokens': np.arange(n, dtype=np.int32) + 1000 * (i + 1)}
          for i, n in enumerate(DOC_LENGTHS)]


def _packed(chunk_size):
  chunks = grain.MapDataset.source(_docs()).batch(chunk_size, batch_fn=list)
  return PackIterDataset(chunks.to_iter_dataset(), seq_len=SEQ_LEN, pad_values={'tokens': -1})


@pytest.mark.parametrize('chunk_size', [1, 3, 100])
def test_rows_are_full_and_segments_right(chunk_size):
  rows = list(_packed(chunk_size))
  total = sum(DOC_LENGTHS)
  assert len(rows) == -(-total // SEQ_LEN)
  for row in rows[:-1]:  # No waste: only the last row has padding.
    assert (row['segment_ids'] > 0).all()
  last = rows[-1]
  assert (last['segment_ids'] > 0).sum() == total - SEQ_LEN * (len(rows) - 1)
  assert (last['tokens'][last['segment_ids'] == 0] == -1).all()
  # Concatenating the real tokens gives back the documents, in order.
  real = np.concatenate([r['tokens'][r['segment_ids'] > 0] for r in rows])
  np.testing.assert_array_equal(real, np.concatenate([d['tokens'] for d in _docs()]))
  for row in rows:
    seg, pos, tokens = row['segment_ids'], row['positions'], row['tokens']
    ids = seg[seg > 0]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    for s in np.unique(ids):
      in_segment = seg == s
      # One document per segment; positions count from 0 within the segment.
      assert len(np.unique(tokens[in_segment] // 1000)) == 1
      np.testing.assert_array_equal(pos[in_segment], np.arange(in_segment.sum()))
    assert (pos[seg == 0] == 0).all()


@pytest.mark.parametrize('chunk_size', [1, 4])
def test_resume_from_every_row(chunk_size):
  rows = list(_packed(chunk_size))
  for k in range(len(rows) + 1):
    it = iter(_packed(chunk_size))
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(_packed(chunk_size))
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(rows) - k
    for got, want in zip(rest, rows[k:]):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_causal_lm_rows_predict_the_next_token_within_documents(shared_data, data_cache):
  cfg = data_testing.shakespeare_config(shared_data, data_cache)
  cfg.doc_boundary = 'line'
  cfg.shuffle = False
  tok = data.load_tokenizer(cfg)
  it = data.train_iterator(cfg)
  pieces = []
  for _ in range(20):
    batch = next(it)
    assert (batch['segment_ids'] > 0).all()  # An endless stream has no padding at all.
    assert (batch['weights'] == 1).all()
    for tokens, targets, seg in zip(batch['tokens'], batch['targets'], batch['segment_ids']):
      for s in np.unique(seg):
        x, y = tokens[seg == s], targets[seg == s]
        np.testing.assert_array_equal(x[1:], y[:-1])  # The target is the next input...
        assert tok.bos_id not in y and tok.eos_id not in x  # ...never across a boundary.
        pieces.append(np.concatenate([x[:1], y]) if x[0] == tok.bos_id else y)
  # Reassembled, the stream is the stored documents, whole, bos/eos-framed, in stored order.
  stream = np.concatenate(pieces)
  docs = np.split(stream, np.flatnonzero(stream == tok.bos_id))[1:-1]
  assert len(docs) > 50
  corpus = sources.open_corpus(data.DataConfig.from_config(cfg))
  stored = [corpus.reader(r)[0] for r in corpus.train.__getitems__(list(range(len(docs))))]
  for doc, text in zip(docs, stored):
    assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
    assert tok.decode(doc) == text
