"""Longest-match lookup: for every token, the f-grams ending at it, on the host, vectorised.

For each length n = 2..K the window of n tokens ending at position t is hashed (a polynomial hash
in uint64 arithmetic, extended one token to the left per length) and looked up with
`np.searchsorted` in the sorted hashes of the f-grams of that length; a hit is then verified
against the f-gram's tokens, so a hash collision can never produce a wrong match (two f-grams of
one length sharing a hash would lose one of them: `FgramIndex` refuses that, and with 64-bit hashes
it does not happen in practice).

A window must lie inside one document piece: position t's window of length n needs
`positions[t] >= n - 1` (positions count from the start of each packed piece) and a real token
(segment id > 0), so matches never cross packing boundaries.

`hits` gives, per position, the id of the matching f-gram of each length (-1 = none): the model
turns that into the longest f-gram among the first `n_used` (the elastic dimension). Because every
prefix of the frequency order is closed under suffixes (fgrams.py), the longest match of the
restricted set is the longest hit whose id is < n_used, which `longest` computes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from elastic_jax.scone.fgrams import Fgrams

_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial hash


def _hash_step(h: np.ndarray, tok: np.ndarray, power: np.uint64) -> np.ndarray:
  """Prepends a token: h(tok, rest) = (tok + 1) * P^(len(rest)) + h(rest) (mod 2^64)."""
  with np.errstate(over='ignore'):
    return h + (tok.astype(np.uint64) + np.uint64(1)) * power


class FgramIndex:
  """Sorted hashes of the f-grams, per length, for vectorised lookup."""

  def __init__(self, fgrams: Fgrams):
    self.fgrams = fgrams
    self.max_n = fgrams.max_n
    k = self.max_n
    tokens, lengths = fgrams.tokens_SK, fgrams.lengths_S
    self.tables = {}
    for n in range(2, k + 1):
      ids = np.flatnonzero(lengths == n).astype(np.int32)
      h = np.zeros(len(ids), np.uint64)
      power = np.uint64(1)
      for j in range(n):
        h = _hash_step(h, tokens[ids, k - 1 - j], power)
        with np.errstate(over='ignore'):
          power = power * _P
      order = np.argsort(h, kind='stable')
      h, ids = h[order], ids[order]
      if len(h) > 1 and np.any(h[1:] == h[:-1]):
        raise ValueError(f'two f-grams of length {n} share a 64-bit hash; change _P')
      self.tables[n] = (h, ids)

  def __reduce__(self):  # grain worker processes rebuild the index from the f-grams
    return (FgramIndex, (self.fgrams,))

  def hits(self, tokens_BT: np.ndarray, positions_BT: np.ndarray | None = None,
           segment_ids_BT: np.ndarray | None = None) -> np.ndarray:
    """int32 [B, T, K-1]: column n-2 is the id of the f-gram of length n ending at t, or -1."""
    tokens_BT = np.asarray(tokens_BT)
    b, t = tokens_BT.shape
    k = self.max_n
    if positions_BT is None:
      positions_BT = np.broadcast_to(np.arange(t), (b, t))
    real_BT = (np.ones((b, t), bool) if segment_ids_BT is None
               else np.asarray(segment_ids_BT) > 0)
    out = np.full((b, t, k - 1), -1, np.int32)
    h = np.zeros((b, t), np.uint64)
    # The last token of every window: the position itself.
    h = _hash_step(h, tokens_BT, np.uint64(1))
    power = _P
    padded = np.concatenate([np.zeros((b, k - 1), tokens_BT.dtype), tokens_BT], axis=1)
    fg = self.fgrams.tokens_SK
    for n in range(2, k + 1):
      left = padded[:, k - n:k - n + t]  # token n-1 places before t
      h = _hash_step(h, left, power)
      with np.errstate(over='ignore'):
        power = power * _P
      table, ids = self.tables[n]
      if not len(table):
        continue
      can = real_BT & (np.asarray(positions_BT) >= n - 1)
      i = np.minimum(np.searchsorted(table, h), len(table) - 1)
      found = can & (table[i] == h)
      cand = ids[i]
      # Verify the tokens of each hash hit (exactness whatever the hash does).
      bi, ti = np.nonzero(found)
      if len(bi):
        win = padded[bi[:, None], ti[:, None] + np.arange(k - n, k)[None, :]]
        ok = np.all(win == fg[cand[bi, ti]][:, k - n:], axis=1)
        out[bi[ok], ti[ok], n - 2] = cand[bi[ok], ti[ok]]
    return out


def longest(hits_BTN: np.ndarray, n_used: int | None = None) -> np.ndarray:
  """int32 [B, T]: the id of the longest f-gram among the first `n_used` ending at each position
  (all f-grams when None), -1 where none."""
  valid = hits_BTN >= 0
  if n_used is not None:
    valid &= hits_BTN < n_used
  n = valid.shape[-1]
  last = n - 1 - np.argmax(valid[..., ::-1], axis=-1)  # longest valid length column
  ids = np.take_along_axis(hits_BTN, last[..., None], axis=-1)[..., 0]
  return np.where(valid.any(-1), ids, -1).astype(np.int32)


@dataclasses.dataclass
class AddFgramHits:
  """Batch transform for the host data pipeline: adds `fgram_hits` int32 [B, T, K-1]."""

  index: FgramIndex

  def __call__(self, batch: dict) -> dict:
    hits = self.index.hits(batch['tokens'], batch.get('positions'), batch.get('segment_ids'))
    return {**batch, 'fgram_hits': hits}
