"""f-gram extraction and longest-match lookup against brute-force Python references."""

from collections import Counter

import numpy as np
import pytest

from elastic_jax.errors import UserError
from elastic_jax.scone import fgrams as fgrams_lib
from elastic_jax.scone import lookup
from elastic_jax.scone.config import scone_config


def brute_fgrams(docs, max_n, min_count, num):
  """The paper's rule spelled out with Counters and sets."""
  kept = {}
  for n in range(2, max_n + 1):
    c = Counter(tuple(d[i:i + n]) for d in docs for i in range(len(d) - n + 1))
    kept[n] = {g: k for g, k in c.items() if k >= min_count
               and (n == 2 or (g[:-1] in kept[n - 1] and g[1:] in kept[n - 1]))}
  allg = [(g, k) for n in kept for g, k in kept[n].items()]
  allg.sort(key=lambda gk: (-gk[1], len(gk[0]), gk[0]))
  return allg[:num]


def corpus(seed, n_docs=13, vocab=5):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, vocab, 7).tolist()  # a repeated phrase makes long f-grams frequent
  docs = []
  for _ in range(n_docs):
    d = rng.integers(0, vocab, rng.integers(0, 41)).tolist()
    at = rng.integers(0, len(d) + 1)
    docs.append(d[:at] + base[:rng.integers(2, 8)] + d[at:])
  return docs


def chunked(docs, size):
  return lambda: ([np.asarray(d, np.int32) for d in docs[i:i + size]]
                  for i in range(0, len(docs), size))


@pytest.mark.parametrize('seed,max_n,min_count,num', [(0, 5, 3, 1000), (1, 4, 2, 17),
                                                     (2, 2, 5, 1000), (3, 6, 4, 40)])
def test_extraction_equals_brute_force_count(seed, max_n, min_count, num):
  docs = corpus(seed)
  got = fgrams_lib.extract(chunked(docs, 4), max_n=max_n, min_count=min_count, num_fgrams=num)
  want = brute_fgrams(docs, max_n, min_count, num)
  assert [(got.gram(i), int(got.counts_S[i])) for i in range(len(got))] == want
  assert len(want) > 5 and max(len(g) for g, _ in want) >= min(max_n, 3)


def test_pruning_only_saves_work():
  """An n-gram's prefix and suffix occur at least as often as it does, so the pruning rule never
  drops a gram that meets min_count: the result equals an unpruned count of every length."""
  docs = corpus(7, n_docs=25)
  got = fgrams_lib.extract(chunked(docs, 3), max_n=5, min_count=3, num_fgrams=10**6)
  unpruned = Counter(tuple(d[i:i + n]) for d in docs for n in range(2, 6)
                     for i in range(len(d) - n + 1))
  want = {g for g, c in unpruned.items() if c >= 3}
  assert {got.gram(i) for i in range(len(got))} == want
  assert any(len(g) == 5 for g in want)
  # A gram below min_count stays out even when its prefix and suffix are frequent.
  docs = [[1, 2, 3]] * 4 + [[1, 2], [2, 3]] * 2 + [[1, 2, 4]]
  got = fgrams_lib.extract(chunked(docs, 2), max_n=3, min_count=4, num_fgrams=100)
  assert {got.gram(i) for i in range(len(got))} == {(1, 2), (2, 3), (1, 2, 3)}


def test_extraction_is_independent_of_chunking():
  docs = corpus(5, n_docs=20)
  a = fgrams_lib.extract(chunked(docs, 1), max_n=5, min_count=3, num_fgrams=50)
  b = fgrams_lib.extract(chunked(docs, 20), max_n=5, min_count=3, num_fgrams=50)
  assert np.array_equal(a.tokens_SK, b.tokens_SK) and np.array_equal(a.counts_S, b.counts_S)


def test_k_below_two_is_one_clear_error():
  with pytest.raises(UserError, match='scone.max_n=1 .* >= 2'):
    fgrams_lib.extract(chunked([[1, 2]], 1), max_n=1, min_count=1, num_fgrams=3)
  with pytest.raises(UserError, match=r'^config field scone.max_n=1 is invalid: .* >= 2') as e:
    scone_config({'enabled': True, 'max_n': 1})
  assert '\n' not in str(e.value)
  with pytest.raises(UserError, match='scone.heads=3 must divide scone.width=64'):
    scone_config({'enabled': True, 'heads': 3})
  assert scone_config({'enabled': False, 'max_n': 1}) is None  # off: not read


def test_fgram_file_round_trip_and_corrupt(tmp_path):
  got = fgrams_lib.extract(chunked(corpus(0), 4), max_n=4, min_count=3, num_fgrams=30)
  got.save(tmp_path / 'f.npz')
  back = fgrams_lib.Fgrams.load(tmp_path / 'f.npz')
  assert back.digest() == got.digest()
  (tmp_path / 'bad.npz').write_bytes(b'not a zip')
  with pytest.raises(UserError, match='cannot read the f-gram file'):
    fgrams_lib.Fgrams.load(tmp_path / 'bad.npz')


def brute_longest(row, positions, segments, grams, n_used):
  table = {g: i for i, g in enumerate(grams[:n_used])}
  out = []
  for t in range(len(row)):
    best = -1
    for n in range(2, max(map(len, grams)) + 1):
      if segments[t] > 0 and positions[t] >= n - 1 and tuple(row[t - n + 1:t + 1]) in table:
        best = table[tuple(row[t - n + 1:t + 1])]
    out.append(best)
  return out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_lookup_equals_brute_force_longest_match(seed):
  docs = corpus(seed)
  fg = fgrams_lib.extract(chunked(docs, 4), max_n=5, min_count=3, num_fgrams=1000)
  grams = [fg.gram(i) for i in range(len(fg))]
  index = lookup.FgramIndex(fg)
  rng = np.random.default_rng(seed)
  # Packed rows: pieces of the documents with positions restarting per piece, padding at the end.
  b, t = 3, 37
  tokens = np.zeros((b, t), np.int32)
  positions = np.zeros((b, t), np.int32)
  segments = np.zeros((b, t), np.int32)
  for r in range(b):
    at, seg = 0, 1
    while at < t - 3:
      d = docs[rng.integers(len(docs))]
      piece = d[:min(len(d), t - 3 - at)]
      tokens[r, at:at + len(piece)] = piece
      positions[r, at:at + len(piece)] = np.arange(len(piece))
      segments[r, at:at + len(piece)] = seg
      at, seg = at + len(piece), seg + 1
  hits = index.hits(tokens, positions, segments)
  found = 0
  for n_used in (len(grams), 7, 1):
    got = lookup.longest(hits, n_used)
    for r in range(b):
      assert got[r].tolist() == brute_longest(tokens[r].tolist(), positions[r], segments[r],
                                              grams, n_used)
    found += int((got >= 0).sum())
  assert found > 10
