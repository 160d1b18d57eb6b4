"""The f-gram model: a small decoder of the model family that turns an f-gram into an embedding.

SCONE (arXiv 2502.01637, section 3): the embedding of token t is the f-gram model's output for the
longest f-gram ending at t, or the ordinary token embedding where none matches. Choices made here
where the paper leaves room:

- Input: the main model's own token embeddings of the f-gram's tokens (after a factorised
  embedding's projection, masked to a sub-network's active hidden features), so the f-gram model
  has no token table of its own; a learned projection hidden -> `width`, learned absolute
  positions 0..n-1, `layers` transformer blocks of the main model's family (its norm, MLP, norm
  placement; always causal, never rotary), then a projection width -> hidden of the last slot's
  state, added to the last token's own embedding (scaled: below). Its output replaces the
  token embedding before positions / token types are added, so the main model is unchanged
  around it.
- The residual path: the paper's f-gram model is a transformer as wide as the main model, so the
  last token's embedding reaches its output along the residual stream. A narrower f-gram model
  (`width` < hidden) would lose that path through its two projections, so it is kept explicitly
  (output = last token's embedding + out_proj(...)), and `out_proj` starts at zero: an untrained
  f-gram model gives exactly the token embedding, i.e. the baseline, and training learns what
  the n-gram adds. (Without it, SCONE at 800 steps on tinyshakespeare was worse than the baseline
  and worsened with more f-grams: every matched position lost its token's own embedding.)
- The added vector is out_proj(h / rms(h)) * 16 / width, h the last slot's state (normalised
  without a gain, in float32). Under Adam every entry of `out_proj` moves by about the learning
  rate per step whatever its gradient's scale, so the added vector's pace grows with the f-gram
  model's width (the fan-in of `out_proj`) and with the scale of h (which grows with depth when
  nothing normalises it): a wider or deeper f-gram model jolted the main model's inputs and
  slowed its training from the first steps. The normalisation removes the scale of h, the
  1 / width multiplier (muP's output multiplier) the width, and 16 sets the pace that suited a
  1 x 64 model. A final norm of the family instead (unit scale per feature, no multiplier) made
  the rows ~5x a token embedding's norm and lost to the baseline.
- The f-gram model reads the token embeddings but does not train them (stop-gradient into its
  input; the residual path above still does): its gradient into the shared, tied table made the
  main model learn more slowly, more so the wider the f-gram model.
- Measured, validation perplexity (tinyshakespeare, the bench's small decoder, 4,000 f-grams,
  800 steps, one run each; the baseline gave 4.549 and 4.571 in two runs, so about +-0.02 is
  noise). h as it is, x 1: 1 x 64 4.478 and 4.493, 2 x 64 4.819, 1 x 128 5.622 (rows ~18x a
  token embedding's norm), 2 x 128 4.965; x 1 / width: 1 x 64 4.596, 1 x 128 4.558; final norm:
  1 x 64 4.572, 2 x 128 4.745; h / rms(h) x 16 / width: 1 x 32 4.555, 1 x 64 4.512, 2 x 64 4.628,
  1 x 128 4.689; the same with the stop-gradient (this module): 1 x 64 4.511, 1 x 128 4.616.
  At this length of training a wider or deeper f-gram model than 1 x 64 still loses; a bigger
  one may pay only with more steps (the paper trains far longer). The multiplier 4 instead of 16
  (1 x 64): 1,000 f-grams 4.594 (16: 4.744), 16,000 f-grams 4.638 (16: 4.575), so neither pace
  wins at every count, and a single run moves by about 0.1 with it.
- Measured on the embedded corpus (BPE, 1,024 tokens; the quickstart's default model, 1 x 64
  f-gram model, 16,000 f-grams, the bench's 800-step schedule, init seed 0; validation
  perplexity on all 19 validation batches at step 100, where two init seeds of the baseline
  differ by 3%: 249.4 and 242.6). The multiplier 16 -> 401.9, 2 -> 308.1, 1 -> 303.3, 0.25 ->
  279.6, 0 -> 249.4 (the baseline's exact losses: with the f-gram path silenced the batches and
  the main model's training are the baseline's); h not normalised, x 1: 376.4, x 16 / width:
  319.0; x 16 with the sum rescaled to the token embedding's own RMS: 305.4, without the
  stop-gradient: 383.8. The global gradient norm is no larger than the baseline's (1.15 vs
  1.66 at step 100), so clipping does not slow the main model. Any amount of the added vector
  slows the main model's early training there, the more the larger it is, and the lag persists
  (x 0.25 at step 500: 87.7 vs 63.5; the other baseline seed: 83.4): on this corpus and scale
  the f-gram path costs more than its n-gram information gives, whatever its pace. The 800-step
  comparison itself is made mid-descent, where the two baseline seeds end at 46.9 and 63.4.
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
from elastic_jax.model.layers import make_param, wide

Array = jax.Array

# The added vector is out_proj(h / rms(h)) * OUTPUT_SCALE / width (module docstring); FORMULA names
# this output for table fingerprints, so a table of another formula is refused.
OUTPUT_SCALE = 16.0
NORM_EPS = 1e-6
FORMULA = f'fgram-output: out_proj(h / rms(h)) * {OUTPUT_SCALE:g} / width; token embeddings read'


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
    # The token embeddings are read, not trained, through the f-gram model (module docstring).
    x = jnp.einsum('NKD,DW->NKW', jax.lax.stop_gradient(x_NKD).astype(dtype),
                   self.in_proj[...].astype(dtype))
    x = x + jnp.take(self.positions[...], pos_NK, axis=0).astype(dtype)
    causal = slot[None, :] <= slot[:, None]
    mask_NKS = (causal[None] & real_NK[:, None, :]) | jnp.eye(k, dtype=bool)[None]
    ctx = Context(mask_NKS, pos_NK, None, x.shape[-1])
    active = None if ffn is None else {'heads': self.heads, 'kv_groups': self.heads,
                                       'head_dim': self.head_dim, 'ffn': ffn}
    for i, block in enumerate(self.blocks):
      y, _ = block(x, ctx, active)
      x = y if layers is None else jnp.where(i < layers, y, x)  # an off block is the identity
    h = x[:, -1].astype(wide(dtype))  # the last slot's state, normalised (no gain)
    h = (h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + NORM_EPS)).astype(dtype)
    delta = jnp.einsum('NW,WD->ND', h, self.out_proj[...].astype(dtype))
    return x_NKD[:, -1].astype(dtype) + (OUTPUT_SCALE / x.shape[-1]) * delta


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
