"""BERT-style masking of packed rows: 15% of real tokens predicted, replaced 80/10/10.

Masking is done per batch from an RNG seeded by (seed, stream, batch index), so the masks are a
function of the step like everything else in the stream and survive a checkpoint restore.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from elastic_jax.data.tokenizer import Tokenizer, WordBoundaries

MASK_SHARE = 0.8  # of selected tokens: replaced by the mask token
RANDOM_SHARE = 0.1  # of selected tokens: replaced by a random ordinary token (the rest are kept)


@dataclasses.dataclass
class MlmMasker:
  """Turns packed rows {tokens, segment_ids, positions} into MLM inputs, targets and weights.

  Called by grain's map_with_index as masker(batch_index, batch).
  """

  tokenizer: Tokenizer
  probability: float
  whole_word: bool
  seed: int
  stream: int  # separates the training stream(s) from the evaluation masks
  max_predictions: int = 0  # at most this many predicted tokens per row, named (0: no cap)

  def __post_init__(self):
    self._is_special = self.tokenizer.is_special
    self._ordinary = self.tokenizer.ordinary_ids
    self._words: WordBoundaries | None = (
        self.tokenizer.word_boundaries() if self.whole_word else None)

  def __call__(self, index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.stream, index])
    tokens_BxL = batch['tokens']
    segment_ids_BxL = batch['segment_ids']
    eligible_BxL = (segment_ids_BxL > 0) & ~self._is_special[tokens_BxL]
    word_BxL = None
    if self._words is None:
      chosen_BxL = rng.random(tokens_BxL.shape) < self.probability
    else:
      word_BxL = word_ids(tokens_BxL, segment_ids_BxL, self._words)
      word_draw_BxW = rng.random((tokens_BxL.shape[0], tokens_BxL.shape[1] + 1))
      chosen_BxL = np.take_along_axis(word_draw_BxW, word_BxL, axis=1) < self.probability
    chosen_BxL &= eligible_BxL
    how_BxL = rng.random(tokens_BxL.shape)
    random_BxL = self._ordinary[rng.integers(0, len(self._ordinary), tokens_BxL.shape)]
    extra = {}
    if self.max_predictions:
      # Drawn after the draws above, so a row under the cap is masked as without one.
      chosen_BxL = capped(chosen_BxL, self.max_predictions, rng, word_BxL)
      extra['mlm_positions'] = predicted_positions(chosen_BxL, self.max_predictions)
    inputs_BxL = np.where(chosen_BxL & (how_BxL < MASK_SHARE), self.tokenizer.mask_id, tokens_BxL)
    use_random_BxL = chosen_BxL & (how_BxL >= MASK_SHARE) & (how_BxL < MASK_SHARE + RANDOM_SHARE)
    inputs_BxL = np.where(use_random_BxL, random_BxL, inputs_BxL)
    return {**batch, 'tokens': inputs_BxL.astype(np.int32), 'targets': tokens_BxL,
            'weights': chosen_BxL.astype(np.float32), **extra}


def capped(chosen_BxL: np.ndarray, cap: int, rng: np.random.Generator,
           word_BxL: np.ndarray | None = None) -> np.ndarray:
  """`chosen_BxL` with at most `cap` True per row (BERT's max_predictions_per_seq). No draw when
  no row is over.

  Without `word_BxL` a row over the cap keeps a uniformly random subset of `cap` positions. With
  it (whole-word masking: int[B, L] word index per token, as `word_ids` numbers them) words stay
  whole, as in BERT's create_masked_lm_predictions: the row's chosen words are visited in a
  uniformly random order and each is kept if it still fits under the cap, else skipped (a
  smaller word later may fit), so a row can end below the cap but never cuts a word.
  """
  count_B = chosen_BxL.sum(axis=1)
  if count_B.max(initial=0) <= cap:
    return chosen_BxL
  rows, length = chosen_BxL.shape
  if word_BxL is None:
    scores_BxL = np.where(chosen_BxL, rng.random(chosen_BxL.shape), 2.0)
    rank_BxL = np.argsort(np.argsort(scores_BxL, axis=1, kind='stable'), axis=1, kind='stable')
    return chosen_BxL & (rank_BxL < cap)
  order_BxW = np.argsort(rng.random((rows, length + 1)), axis=1)  # a row's words in random order
  kept_BxL = chosen_BxL.copy()
  for row in np.flatnonzero(count_B > cap):
    size_W = np.bincount(word_BxL[row], weights=chosen_BxL[row], minlength=length + 1)
    keep_W = np.zeros(length + 1, bool)
    room = cap
    for word in order_BxW[row]:
      if 0 < size_W[word] <= room:
        keep_W[word] = True
        room -= int(size_W[word])
    kept_BxL[row] &= keep_W[word_BxL[row]]
  return kept_BxL


def predicted_positions(chosen_BxL: np.ndarray, cap: int) -> np.ndarray:
  """int32[B, cap]: each row's chosen positions in order, then -1 (at most `cap` chosen)."""
  order_BxP = np.argsort(~chosen_BxL, axis=1, kind='stable')[:, :cap]
  count_B = chosen_BxL.sum(axis=1)
  return np.where(np.arange(cap)[None, :] < count_B[:, None], order_BxP, -1).astype(np.int32)


def word_ids(tokens_BxL: np.ndarray, segment_ids_BxL: np.ndarray,
             words: WordBoundaries) -> np.ndarray:
  """int[B, L]: index of the word each token belongs to, counted from 0 along each row.

  A word starts at a token that `starts` one or after a token that `ends` one, unless the token
  always continues (WordPiece '##'); and always at a row or segment start.
  """
  starts_BxL = words.starts[tokens_BxL].copy()
  starts_BxL[:, 1:] |= words.ends[tokens_BxL[:, :-1]]
  starts_BxL &= ~words.continues[tokens_BxL]
  starts_BxL[:, 1:] |= segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]
  starts_BxL[:, 0] = True
  return np.cumsum(starts_BxL, axis=1) - 1
