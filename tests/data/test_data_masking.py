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
