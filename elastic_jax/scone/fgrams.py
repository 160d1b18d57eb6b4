"""f-gram extraction: the frequent token n-grams (n = 2..K) of a tokenised corpus, SCONE's set.

SCONE (Yu et al., arXiv 2502.01637, section 3) builds its f-grams with K - 1 scans of the corpus:
scan n counts the n-grams whose (n-1)-token prefix and suffix both survived scan n - 1, keeps those
seen at least `min_count` times, and the survivors of all scans are ranked by frequency; the top
`num_fgrams` (S) are the f-grams. Choices the paper leaves open, made here:

- Order: count descending, then length ascending, then the tokens lexicographically (ties are
  broken by the n-gram itself, so the result is a function of the corpus). Because an n-gram's
  prefix and suffix occur at least as often as it does and are shorter, they always rank before it:
  every prefix of the frequency order (the first `n_used` f-grams, the elastic dimension) is closed
  under taking prefixes and suffixes. `lookup.py` relies on this.
- The pruning never changes the result, only the work: an n-gram's prefix and suffix occur at
  least as often as it does, so any n-gram counted `min_count` times has both kept. It is kept
  because it bounds what each scan has to count (tested against unpruned brute-force counts).
- n-grams never cross documents (each document is one framed token sequence as the model reads it).
- Counting is exact: each window is a big-endian byte string (`np.void` of 4 n bytes), so
  `np.unique` sorts it in numeric lexicographic order with no hash collisions; a scan streams over
  chunks of documents and merges the per-chunk counts, so memory holds the distinct n-grams that
  passed the pruning, never the corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from elastic_jax.errors import UserError

PAD = -1  # left padding of shorter f-grams in the [S, K] token matrix (they are right-aligned)
_MERGE_ROWS = 1 << 22  # merge per-chunk counts once this many (n-gram, count) rows are pending


def check_max_n(max_n: int) -> None:
  if not isinstance(max_n, int) or isinstance(max_n, bool) or max_n < 2:
    raise UserError(f'config field scone.max_n={max_n!r} is invalid: f-grams are n-grams with '
                    'n = 2..max_n, so it must be an integer >= 2 (the paper uses 5)')


@dataclasses.dataclass(frozen=True)
class Fgrams:
  """The f-grams in frequency order: id i is row i.

  tokens_SK: int32 [S, K], f-gram i right-aligned in its row (its last token in column K - 1),
    PAD to its left; lengths_S: int32 [S] (2..K); counts_S: int64 [S] corpus counts.
  """

  tokens_SK: np.ndarray
  lengths_S: np.ndarray
  counts_S: np.ndarray
  min_count: int

  @property
  def max_n(self) -> int:
    return int(self.tokens_SK.shape[1])

  def __len__(self) -> int:
    return int(self.tokens_SK.shape[0])

  def gram(self, i: int) -> tuple[int, ...]:
    return tuple(int(t) for t in self.tokens_SK[i, self.max_n - self.lengths_S[i]:])

  def digest(self) -> str:
    """sha256 of the f-gram list (what a precomputed table is tied to)."""
    h = hashlib.sha256()
    for a in (self.tokens_SK, self.lengths_S):
      h.update(np.ascontiguousarray(a, np.int32).tobytes())
    return h.hexdigest()

  def save(self, path: str | Path) -> None:
    """Writes an .npz atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp.npz')
    np.savez(tmp, tokens_SK=self.tokens_SK, lengths_S=self.lengths_S, counts_S=self.counts_S,
             min_count=np.int64(self.min_count))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | Path) -> Fgrams:
    try:
      with np.load(path) as z:
        out = cls(tokens_SK=z['tokens_SK'].astype(np.int32),
                  lengths_S=z['lengths_S'].astype(np.int32),
                  counts_S=z['counts_S'].astype(np.int64), min_count=int(z['min_count']))
    except (OSError, ValueError, KeyError) as e:
      raise UserError(f'cannot read the f-gram file {path} ({type(e).__name__}: {e}); delete it '
                      'and let training extract the f-grams again') from None
    if out.tokens_SK.ndim != 2 or len(out.lengths_S) != len(out.tokens_SK):
      raise UserError(f'the f-gram file {path} is inconsistent (shapes {out.tokens_SK.shape}, '
                      f'{out.lengths_S.shape}); delete it and extract the f-grams again')
    return out


def _keys(windows_NN: np.ndarray) -> np.ndarray:
  """[N, n] non-negative token windows -> [N] byte strings ordered like the token tuples."""
  n = windows_NN.shape[1]
  be = np.ascontiguousarray(windows_NN.astype('>u4'))
  return be.view(np.dtype((np.void, 4 * n))).reshape(-1)


def _tokens_of(keys_M: np.ndarray, n: int) -> np.ndarray:
  return keys_M.view('>u4').reshape(-1, n).astype(np.int32)


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
  if len(sorted_keys) == 0:
    return np.zeros(len(keys), bool)
  i = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
  return sorted_keys[i] == keys


def _windows(docs: Sequence[np.ndarray], n: int) -> np.ndarray:
  """All [N, n] windows of n consecutive tokens inside one document, over a chunk of documents."""
  docs = [np.asarray(d) for d in docs if len(d) >= n]
  if not docs:
    return np.zeros((0, n), np.int32)
  flat = np.concatenate(docs).astype(np.int64)
  if flat.min() < 0:
    raise UserError('token ids must be non-negative to extract f-grams')
  lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
  doc_end = np.repeat(np.cumsum(lengths), lengths)  # exclusive end of each token's document
  starts = np.flatnonzero(np.arange(len(flat)) + n <= doc_end)
  return np.lib.stride_tricks.sliding_window_view(flat, n)[starts]


class _Counter:
  """Distinct keys with summed counts, merged from chunks (sorted, exact)."""

  def __init__(self):
    self.keys, self.counts, self.pending = None, None, []

  def add(self, keys: np.ndarray) -> None:
    if len(keys):
      self.pending.append(np.unique(keys, return_counts=True))
    if sum(len(k) for k, _ in self.pending) > _MERGE_ROWS:
      self._merge()

  def _merge(self) -> None:
    parts = self.pending + ([(self.keys, self.counts)] if self.keys is not None else [])
    self.pending = []
    if not parts:
      return
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts]).astype(np.int64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    self.keys, self.counts = uniq, np.bincount(inverse.reshape(-1), counts, len(uniq))

  def result(self, dtype) -> tuple[np.ndarray, np.ndarray]:
    self._merge()
    if self.keys is None:
      return np.zeros(0, dtype), np.zeros(0, np.int64)
    return self.keys, self.counts.astype(np.int64)


def extract(chunks: Callable[[], Iterable[Sequence[np.ndarray]]], *, max_n: int = 5,
            min_count: int = 5, num_fgrams: int) -> Fgrams:
  """The top `num_fgrams` f-grams of a corpus.

  `chunks()` gives a fresh iterable of chunks, each a sequence of documents (int token arrays);
  it is called once per scan (max_n - 1 times), so it may stream from disk.
  """
  check_max_n(max_n)
  if not isinstance(min_count, int) or min_count < 1:
    raise UserError(f'config field scone.min_count={min_count!r} must be an integer >= 1')
  if not isinstance(num_fgrams, int) or num_fgrams < 1:
    raise UserError(f'config field scone.num_fgrams={num_fgrams!r} must be an integer >= 1')
  kept = []  # per n: (sorted keys, counts) of the n-grams that survived
  previous = None
  for n in range(2, max_n + 1):
    counter = _Counter()
    for docs in chunks():
      w = _windows(docs, n)
      if previous is not None and len(w):
        # Scan n counts only n-grams whose prefix and suffix survived scan n - 1.
        ok = _member(_keys(w[:, :-1]), previous) & _member(_keys(w[:, 1:]), previous)
        w = w[ok]
      counter.add(_keys(w))
    keys, counts = counter.result(np.dtype((np.void, 4 * n)))
    frequent = counts >= min_count
    keys, counts = keys[frequent], counts[frequent]
    kept.append((n, keys, counts))
    previous = keys
    if not len(keys):  # nothing longer can survive
      break
  tokens, lengths, counts = [], [], []
  for n, keys, c in kept:
    t = np.full((len(keys), max_n), PAD, np.int32)
    t[:, max_n - n:] = _tokens_of(keys, n)
    tokens.append(t)
    lengths.append(np.full(len(keys), n, np.int32))
    counts.append(c)
  tokens_MK = np.concatenate(tokens) if tokens else np.zeros((0, max_n), np.int32)
  lengths_M = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
  counts_M = np.concatenate(counts) if counts else np.zeros(0, np.int64)
  # Left-aligned tokens (PAD after) as the lexicographic tie-break; lexsort's last key is primary.
  left = np.full_like(tokens_MK, PAD)
  for n in range(2, max_n + 1):
    rows = lengths_M == n
    left[rows, :n] = tokens_MK[rows, max_n - n:]
  order = np.lexsort(tuple(left[:, j] for j in range(max_n - 1, -1, -1))
                     + (lengths_M, -counts_M))[:num_fgrams]
  return Fgrams(tokens_SK=tokens_MK[order], lengths_S=lengths_M[order], counts_S=counts_M[order],
                min_count=min_count)
