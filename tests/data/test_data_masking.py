"""MLM masking: 15% of real tokens, replaced 80/10/10, whole words together, never specials."""

import data_testing
import numpy as np

import elastic_jax.data as data
from elastic_jax.data.masking import MlmMasker, word_ids

TOK = data.ByteTokenizer()


def _batch(rows=61, length=503, seed=0):
  """Random printable bytes with spaces, a padded tail and bos/eos specials in each row."""
  rng = np.random.default_rng(seed)
  tokens = rng.choice(np.frombuffer(b'abcdefghij    ', np.uint8), (rows, length)).astype(np.int32)
  segment_ids = np.ones((rows, length), np.int32)
  segment_ids[:, length // 2:] = 2
  segment_ids[:, -37:] = 0
  tokens[:, -37:] = TOK.pad_id
  tokens[:, 0] = TOK.cls_id
  tokens[:, length // 2 - 1] = TOK.sep_id
  positions = np.zeros_like(tokens)
  return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions}


def _within(observed, expected, n, sigmas=5.0):
  return abs(observed - expected) <= sigmas * np.sqrt(expected * (1 - expected) / n)


def test_rates_and_replacements():
  batch = _batch()
  out = MlmMasker(TOK, 0.15, False, seed=3, stream=1)(7, batch)
  original = batch['tokens']
  np.testing.assert_array_equal(out['targets'], original)
  eligible = (batch['segment_ids'] > 0) & ~TOK.is_special[original]
  chosen = out['weights'] > 0
  assert not (chosen & ~eligible).any()  # Never padding or special tokens.
  np.testing.assert_array_equal(out['tokens'][~chosen], original[~chosen])
  n = eligible.sum()
  assert _within(chosen.sum() / n, 0.15, n)
  picked = chosen.sum()
  masked = (out['tokens'] == TOK.mask_id) & chosen
  changed = (out['tokens'] != original) & ~masked & chosen
  kept = (out['tokens'] == original) & chosen
  assert _within(masked.sum() / picked, 0.8, picked)
  # A random replacement equals the original with probability 1/256 (and then counts as kept).
  assert _within(changed.sum() / picked, 0.1 * 255 / 256, picked)
  assert _within(kept.sum() / picked, 0.1 + 0.1 / 256, picked)
  assert not TOK.is_special[out['tokens'][changed]].any()  # Random tokens are ordinary ids.
  assert out['tokens'].dtype == np.int32 and out['weights'].dtype == np.float32


def test_masks_depend_on_seed_and_index_only():
  batch = _batch(rows=5, length=101)
  masker = MlmMasker(TOK, 0.15, False, seed=3, stream=1)
  first = masker(4, batch)
  np.testing.assert_array_equal(first['tokens'], masker(4, batch)['tokens'])
  np.testing.assert_array_equal(
      first['tokens'], MlmMasker(TOK, 0.15, False, seed=3, stream=1)(4, batch)['tokens'])
  assert not np.array_equal(first['weights'], masker(5, batch)['weights'])
  assert not np.array_equal(first['weights'],
                            MlmMasker(TOK, 0.15, False, seed=3, stream=2)(4, batch)['weights'])


def test_whole_word_masking():
  batch = _batch()
  out = MlmMasker(TOK, 0.15, True, seed=5, stream=1)(0, batch)
  chosen = out['weights'] > 0
  words = word_ids(batch['tokens'], batch['segment_ids'], TOK.word_boundaries())
  selected_words = total_words = 0
  for row in range(len(words)):
    for w in np.unique(words[row]):
      in_word = (words[row] == w) & (batch['segment_ids'][row] > 0)
      letters = in_word & ~TOK.is_special[batch['tokens'][row]] & (batch['tokens'][row] != 32)
      if not letters.any():
        continue
      total_words += 1
      flags = chosen[row][letters]
      assert flags.all() or not flags.any()  # A word is masked whole or not at all.
      selected_words += flags.all()
  assert _within(selected_words / total_words, 0.15, total_words)


def test_word_ids_of_bytes():
  text = b'ab cd  e'
  tokens = np.frombuffer(text, np.uint8).astype(np.int32)[None]
  segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
  # 'ab', ' ', 'c', then a new segment starts inside 'cd': 'd', ' ', ' ', 'e'.
  np.testing.assert_array_equal(word_ids(tokens, segment_ids, TOK.word_boundaries()),
                                [[0, 0, 1, 2, 3, 4, 5, 6]])


def test_mlm_pipeline_rate(shared_data, data_cache):
  cfg = data_testing.shakespeare_config(shared_data, data_cache)
  cfg.task = 'mlm'
  cfg.batch_size = 16
  cfg.seq_len = 127
  it = data.train_iterator(cfg)
  batches = [next(it) for _ in range(8)]
  chosen = np.concatenate([b['weights'] for b in batches]) > 0
  targets = np.concatenate([b['targets'] for b in batches])
  eligible = ~TOK.is_special[targets]  # The stream has no padding; [cls]/[sep] frame documents.
  assert not (chosen & ~eligible).any()
  assert _within(chosen.sum() / eligible.sum(), 0.15, eligible.sum())
  # With a cap (data.mlm_max_predictions) the pipeline names each row's predicted positions.
  cfg.mlm_max_predictions = 24
  for b in [next(data.train_iterator(cfg))] + data.eval_batches(cfg)[:2]:
    weights, positions = b['weights'] > 0, b['mlm_positions']
    assert positions.shape == (len(weights), 24)
    for row in range(len(weights)):
      want = np.flatnonzero(weights[row]).tolist()
      assert positions[row].tolist() == want + [-1] * (24 - len(want))


def test_a_prediction_cap_keeps_rows_under_it_and_names_the_positions():
  batch = _batch(rows=40, length=128, seed=2)
  free = MlmMasker(TOK, 0.15, False, seed=3, stream=1)(9, batch)
  cap = 13  # about the mean count here (0.15 x 89 eligible), so many rows are over it
  out = MlmMasker(TOK, 0.15, False, seed=3, stream=1, max_predictions=cap)(9, batch)
  before, after = free['weights'] > 0, out['weights'] > 0
  counts = before.sum(axis=1)
  assert (counts > cap).any() and (counts <= cap).any()  # both kinds of row are tested
  assert (after.sum(axis=1) == np.minimum(counts, cap)).all()
  assert not (after & ~before).any()  # a subset of what was chosen without the cap
  under = counts <= cap
  for key in ('tokens', 'targets', 'weights'):  # rows under the cap: masked as without it
    np.testing.assert_array_equal(out[key][under], free[key][under])
  # An over-full row's dropped positions are plain input again, its kept ones as drawn.
  dropped = before & ~after
  np.testing.assert_array_equal(out['tokens'][dropped], batch['tokens'][dropped])
  np.testing.assert_array_equal(out['tokens'][after], free['tokens'][after])
  # mlm_positions: each row's chosen positions in increasing order, then -1 (brute force).
  assert out['mlm_positions'].shape == (40, cap) and out['mlm_positions'].dtype == np.int32
  for row in range(40):
    want = np.flatnonzero(after[row]).tolist()
    assert out['mlm_positions'][row].tolist() == want + [-1] * (cap - len(want))
  assert 'mlm_positions' not in free


def test_the_cap_drops_a_uniform_subset():
  """Which of an over-full row's positions survive is uniform: every chosen position of a
  fully eligible row is kept about cap / count of the time over many draws."""
  batch = _batch(rows=400, length=128, seed=5)
  kept = chosen = 0
  for index in range(20):
    free = MlmMasker(TOK, 0.5, False, seed=1, stream=1)(index, batch)['weights'] > 0
    out = MlmMasker(TOK, 0.5, False, seed=1, stream=1, max_predictions=8)(index, batch)
    over = free.sum(axis=1) > 8
    kept = kept + (out['weights'] > 0)[over, 1:63].sum(axis=0)  # 1..62: eligible in every row
    chosen = chosen + free[over, 1:63].sum(axis=0)
  share = kept / chosen  # per position: no position is favoured (not the first, not the last)
  assert share.max() - share.min() < 0.06, share


def test_the_cap_keeps_whole_words():
  """With whole-word masking a row over the cap keeps whole words only, as BERT's
  create_masked_lm_predictions does (words in random order, each kept if it still fits): every
  word is kept whole or dropped whole, and every dropped word was too big for the room left."""
  batch = _batch(rows=300, length=128, seed=7)
  words = word_ids(batch['tokens'], batch['segment_ids'], TOK.word_boundaries())
  cap = 9
  kept_by_size, chosen_by_size = np.zeros(8), np.zeros(8)
  for index in range(4):
    free = MlmMasker(TOK, 0.3, True, seed=2, stream=1)(index, batch)
    out = MlmMasker(TOK, 0.3, True, seed=2, stream=1, max_predictions=cap)(index, batch)
    before, after = free['weights'] > 0, out['weights'] > 0
    counts = before.sum(axis=1)
    assert (counts > cap).sum() > 100 and (counts <= cap).any()
    assert not (after & ~before).any() and (after.sum(axis=1) <= cap).all()
    under = counts <= cap
    np.testing.assert_array_equal(out['tokens'][under], free['tokens'][under])
    for row in np.flatnonzero(~under):
      room = cap - after[row].sum()
      for w in np.unique(words[row][before[row]]):
        was, now = before[row][words[row] == w], after[row][words[row] == w]
        assert now.all() or not now.any(), (row, w)  # never cut inside a word
        size = int(was.sum())
        if not now.any():
          assert size > room, (row, w, size, room)  # dropped only when it did not fit
        if size < 8:
          kept_by_size[size] += now.any()
          chosen_by_size[size] += 1
      want = np.flatnonzero(after[row]).tolist()
      assert out['mlm_positions'][row].tolist() == want + [-1] * (cap - len(want))
  # Every word size is kept a fair share of the time (the order is random, not smallest first).
  share = kept_by_size[1:5] / chosen_by_size[1:5]
  assert (chosen_by_size[1:5] > 50).all() and (share > 0.2).all(), (chosen_by_size, share)
