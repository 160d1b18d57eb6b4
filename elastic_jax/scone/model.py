"""The f-gram model: a small decoder of the model family that turns an f-gram into an embedding.

SCONE (arXiv 2502.01637, section 3): the embedding of token t is the f-gram model's output for the
longest f-gram ending at t, or the ordinary token embedding where none matches. Choices made here
where the paper leaves room:

- Input: the main model's own token embeddings of the f-gram's tokens (after a factorised
  embedding's projection, masked to a sub-network's active hidden features), so the f-gram model
  has no token table of its own; a learned projection hidden -> `width`, learned absolute
  positions 0..n-1, `layers` transformer blocks of the main model's family (its norm, MLP, norm
  placement; always causal, never rotary), then a projection width -> hidden of the last slot's
  state, added to the last token's own embedding (no final norm: below). Its output replaces the
  token embedding before positions / token types are added, so the main model is unchanged
  around it.
- The residual path: the paper's f-gram model is a transformer as wide as the main model, so the
  last token's embedding reaches its output along the residual stream. A narrower f-gram model
  (`width` < hidden) would lose that path through its two projections, so it is kept explicitly
  (output = last token's embedding + out_proj(...)), and `out_proj` starts at zero: an untrained
  f-gram model gives exactly the token embedding, i.e. the baseline, and training learns what
  the n-gram adds. (Without it, SCONE at 800 steps on tinyshakespeare was worse than the baseline
  and worsened with more f-grams: every matched position lost its token's own embedding.)
- No final norm: the last slot's state goes to `out_proj` as it is. A final norm (pre-norm
  families end with one) pins that state at about unit scale per feature: the table rows had a
  median norm of 6.8, ~5x a token embedding's (about 1.4), and SCONE was worse than the
  baseline (validation perplexity 4.572 against 4.549: tinyshakespeare, the bench's small
  decoder, a 1 x 64 f-gram model, 4,000 f-grams, 800 steps). Without it the rows keep the token
  embeddings' scale (median 1.29) and the perplexity is 4.493; shrinking the added vector
  tenfold instead gives 4.550.
- Shapes: an f-gram of length n is right-aligned in a window of K slots (its last token in slot
  K - 1, the output read there); padding slots attend only to themselves and are never attended
  to, so the output depends on the n real tokens alone and never on NaN-producing empty rows.
- Elastic size (the arch's `fgram_layers`, `fgram_ffn`): blocks beyond the active depth are
  exact identities and FFN columns beyond the active width are masked, as in the main model, so
  a sub-network's f-gram model computes what the dense smaller one does (sliced weights).
- Training computes it per token from the row's own tokens (the K tokens ending at t) and the
  match length the host lookup gives; inference reads precomputed rows (table.py). Both go through
  `substitute`, so given the same rows the two forwards are the same computation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax.config import LayerDims, ModelConfig, ModelDims
from elastic_jax.model.blocks import Context, TransformerBlock
from elastic_jax.model.layers import make_param

Array = jax.Array


def match_lengths(hits_BTN: Array, limit_B: Array | None) -> Array:
  """int32 [B, T]: the length of the longest f-gram among the first `limit` ending at each
  position (0 = none), from the host's per-length hits (`lookup.AddFgramHits`)."""
  valid = hits_BTN >= 0
  if limit_B is not None:
    valid = valid & (hits_BTN < limit_B[:, None, None])
  n = jnp.arange(2, hits_BTN.shape[-1] + 2, dtype=jnp.int32)
  return jnp.max(jnp.where(valid, n, 0), axis=-1)


def windows(tokens_BT: Array, k: int) -> Array:
  """int32 [B, T, K]: the K tokens ending at each position (0 before the row's start)."""
  padded = jnp.pad(tokens_BT, ((0, 0), (k - 1, 0)))
  t = tokens_BT.shape[1]
  return jnp.stack([padded[:, j:j + t] for j in range(k)], axis=-1)


class FgramModel(nnx.Module):
  """(right-aligned token embeddings [N, K, hidden], lengths [N]) -> embeddings [N, hidden];
  optionally only the first `layers` blocks and `ffn` FFN columns (traced int32 scalars)."""

  def __init__(self, cfg: ModelConfig, hidden: int, scone, *, rngs: nnx.Rngs):
    self.k = scone.max_n
    w = scone.width
    self.heads, self.head_dim = scone.heads, w // scone.heads
    self.cfg = dataclasses.replace(cfg, kind='decoder', positions='learned', max_len=self.k)
    dims = ModelDims(hidden=w, head_dim=w // scone.heads, bottleneck_head_dim=0,
                     layers=(LayerDims(('transformer',), scone.heads, scone.heads, scone.ffn),)
                     * scone.layers)
    self.in_proj = make_param(rngs, (hidden, w), ('embed_in', 'embed'), cfg)
    self.positions = make_param(rngs, (self.k, w), ('pos', 'embed'), cfg)
    self.blocks = nnx.List([TransformerBlock(self.cfg, dims, l, rngs=rngs) for l in dims.layers])
    self.out_proj = make_param(rngs, (w, hidden), ('embed', 'embed_out'), cfg, 'zeros')

  def __call__(self, x_NKD: Array, lengths_N: Array, layers=None, ffn=None) -> Array:
    k = x_NKD.shape[1]  # K, or fewer slots when every f-gram is that short
    dtype = jnp.dtype(self.cfg.dtype)
    slot = jnp.arange(k)
    start_N = k - lengths_N  # first real slot
    real_NK = slot[None, :] >= start_N[:, None]
    pos_NK = jnp.maximum(slot[None, :] - start_N[:, None], 0)
    x = jnp.einsum('NKD,DW->NKW', x_NKD.astype(dtype), self.in_proj[...].astype(dtype))
    x = x + jnp.take(self.positions[...], pos_NK, axis=0).astype(dtype)
    causal = slot[None, :] <= slot[:, None]
    mask_NKS = (causal[None] & real_NK[:, None, :]) | jnp.eye(k, dtype=bool)[None]
    ctx = Context(mask_NKS, pos_NK, None, x.shape[-1])
    active = None if ffn is None else {'heads': self.heads, 'kv_groups': self.heads,
                                       'head_dim': self.head_dim, 'ffn': ffn}
    for i, block in enumerate(self.blocks):
      y, _ = block(x, ctx, active)
      x = y if layers is None else jnp.where(i < layers, y, x)  # an off block is the identity
    return x_NKD[:, -1].astype(dtype) + jnp.einsum('NW,WD->ND', x[:, -1],
                                                  self.out_proj[...].astype(dtype))


def elastic_size(fgram_model: FgramModel, arch) -> tuple:
  """(layers, ffn) of an arch's f-gram model (traced), (None, None) for the whole model; an
  arch field 0 (a space without SCONE dimensions) means the whole."""
  if arch is None:
    return None, None
  full = lambda v, top: jnp.where(v > 0, v, top)
  return (full(arch.fgram_layers, len(fgram_model.blocks)),
          full(arch.fgram_ffn, fgram_model.blocks[0].mlp.ffn if fgram_model.blocks else 1))


def fgram_limit(arch, limit_B: Array | None, b: int) -> Array | None:
  """int32 [B]: the number of f-grams used: the arch's `fgrams` (0: all) and a batch's own
  `fgram_limit`, whichever is smaller; None when neither limits."""
  if arch is None or arch.fgrams is None:
    return limit_B
  big = jnp.iinfo(jnp.int32).max
  arch_B = jnp.broadcast_to(jnp.where(arch.fgrams > 0, arch.fgrams, big), (b,))
  return arch_B if limit_B is None else jnp.minimum(arch_B, limit_B)


def fgram_embeddings(fgram_model: FgramModel, token_vectors, tokens_NK: Array, lengths_N: Array,
                     hidden_mask: Array | None, arch=None) -> Array:
  """[N, hidden] embeddings of N right-aligned f-grams; `token_vectors(ids)` is the main model's
  token embedding (hidden wide); `arch` (or None) sets the f-gram model's elastic size."""
  x = token_vectors(jnp.maximum(tokens_NK, 0))
  if hidden_mask is not None:
    x = x * hidden_mask
  return fgram_model(x, lengths_N, *elastic_size(fgram_model, arch))
