"""Proxies that back-propagate: SNIP, grad-norm, synaptic saliency and diversity, SynFlow, and
jacobian covariance.

Gradients of the masked supernet w.r.t. the supernet's parameters are the sub-network's gradients:
every inactive slice (masked columns, unchosen block types, off layers) receives an exact zero
gradient, so sums over the supernet's parameters equal sums over the exported dense model's
(tested). Parameters are summed per *kernel*: every weight array of rank >= 2 except the
embedding lookup tables (tokens, positions, token types), i.e. the linear maps of attention, FFN,
bottleneck projections, factorised embedding and output head, as the zero-cost-proxy reference
code sums over `nn.Linear` / `nn.Conv` weights; biases and norm parameters are left out.

Losses: SNIP, grad-norm and the synaptic proxies differentiate the mean token cross-entropy of the
batch's `targets` / `weights` (the task loss, as SNIP and grad-norm define them). The Serianni &
Kalita transformer benchmark back-propagates ones from the last hidden state instead; we keep the
task loss, which the masked and dense models share exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax.accumulate import scan_sum
from elastic_jax.losses import token_cross_entropy
from elastic_jax.model.blocks import PARAMETER_CAPTURES, equal_tokens_stay_equal
from elastic_jax.model.layers import Attention, Norm, prefix_mask
from elastic_jax.proxies import features

_TABLES = ('tokens', 'positions', 'types')
# 'wq': weighted multiplicative attention's query map; 'mid': stacked FFN linears (FlexiBERT).
_ATTN_KERNELS = ('q', 'k', 'v', 'o', 'wq')
_FFN_KERNELS = ('up', 'gate', 'down', 'mid')


def kernel_kind(path: tuple, ndim: int) -> str | None:
  """'attn' (attention q/k/v/o), 'ffn' (FFN up/gate/down), 'other' (any other kernel), or None
  (not a kernel: biases, norms, lookup tables)."""
  if ndim < 2 or (path[0] == 'embed' and path[-1] in _TABLES):
    return None
  if 'attn' in path and path[-1] in _ATTN_KERNELS:
    return 'attn'
  if 'mlp' in path and path[-1] in _FFN_KERNELS:
    return 'ffn'
  return 'other'


def _flat(state) -> list[tuple[tuple, jax.Array]]:
  return [(tuple(p), v[...]) for p, v in nnx.to_flat_state(state)]


def _hidden_mask(model, arch) -> jax.Array:
  d = model.dims.hidden
  return jnp.ones((d,), jnp.float32) if arch is None else prefix_mask(d, arch.hidden, jnp.float32)


def _matrix(path: tuple, x: jax.Array) -> jax.Array:
  """Attention kernels as matrices: q/k/v [width, heads, head_dim] -> [width, heads*head_dim];
  o [heads, head_dim, width] -> [heads*head_dim, width]."""
  if path[-1] == 'o':
    return x.reshape(-1, x.shape[-1])
  return x.reshape(x.shape[0], -1)


def _nuclear(m: jax.Array) -> jax.Array:
  return jnp.sum(jnp.linalg.svd(m.astype(jnp.float32), compute_uv=False))


def _diversity(w_m: jax.Array, g_m: jax.Array) -> jax.Array:
  """nuc(W on the rows and columns where dL/dW is non-zero) * nuc(dL/dW); 0 without computing
  either SVD when the whole gradient is zero (a block type the arch does not choose, a layer it
  removes: outside `vmap` only the taken branch of `lax.cond` runs)."""
  rows = jnp.any(g_m != 0, axis=1)
  cols = jnp.any(g_m != 0, axis=0)

  def both(w_m, g_m):
    mask = rows.astype(jnp.float32)[:, None] * cols.astype(jnp.float32)[None, :]
    return _nuclear(w_m * mask) * _nuclear(g_m)

  return jax.lax.cond(jnp.any(rows), both, lambda w_m, g_m: jnp.float32(0.0), w_m, g_m)


def loss_gradient_proxies(state, grads, names: tuple[str, ...]) -> dict[str, jax.Array]:
  """SNIP, grad-norm, synaptic saliency and synaptic diversity from the loss gradient `grads`.

  - snip (Lee et al. 2019): sum over kernels of |W * dL/dW|.
  - grad_norm (Abdelfattah et al. 2021): sum over kernels of the Frobenius norm of dL/dW.
  - synaptic_saliency (TF-TAS, Zhou et al. 2022): sum over FFN kernels of |W * dL/dW|.
  - synaptic_diversity (TF-TAS): sum over attention kernels (as matrices) of
    nuc(W) * nuc(dL/dW). In the masked supernet W is first restricted to the rows and columns
    where dL/dW has any non-zero entry: exactly the sub-network's slice (an inactive row or column
    has an identically zero gradient, an active one almost surely does not), so the nuclear norm
    is that of the dense model's kernel.
  """
  out = {n: jnp.float32(0.0) for n in names}
  for (path, w), (_, g) in zip(_flat(state), _flat(grads)):
    kind = kernel_kind(path, w.ndim)
    if kind is None:
      continue
    w, g = w.astype(jnp.float32), g.astype(jnp.float32)
    saliency = jnp.sum(jnp.abs(w * g))
    if 'snip' in out:
      out['snip'] += saliency
    if 'grad_norm' in out:
      out['grad_norm'] += jnp.sqrt(jnp.sum(g * g))
    if 'synaptic_saliency' in out and kind == 'ffn':
      out['synaptic_saliency'] += saliency
    if 'synaptic_diversity' in out and kind == 'attn':
      out['synaptic_diversity'] += _diversity(_matrix(path, w), _matrix(path, g))
  return out


class _EmbeddingOverride:
  """Stands in for `model.embed`: returns `fn(embedding output, hidden_mask)`; keeps `.tokens`
  (the head reads the tied output table from it) and `token_vectors` (SCONE's f-gram model reads
  the token embeddings through it)."""

  def __init__(self, embed, fn):
    self.tokens = embed.tokens
    self.token_vectors = embed.token_vectors
    self._embed = embed
    self._fn = fn

  def __call__(self, tokens_BT, positions_BT, types_BT, hidden_mask, *args, **kwargs):
    # Everything after the hidden mask goes through untouched, whatever Embedding adds later.
    x = self._embed(tokens_BT, positions_BT, types_BT, hidden_mask, *args, **kwargs)
    return self._fn(x, hidden_mask)


def _with_embedding(model, fn):
  """The model with its embedding output replaced by `fn(x, hidden_mask)` (traced code only)."""
  model.embed = _EmbeddingOverride(model.embed, fn)
  return model


def synflow(graphdef, state, arch, inputs, valid_BT, passes: int = 1) -> jax.Array:
  """SynFlow (Tanaka et al. 2020) adapted to a language model.

  SynFlow scores sum(theta * dR/dtheta) on the *linearised* network: every parameter replaced by
  its absolute value, an all-ones input, R = the sum of the outputs, no normalisation. Here:
  - tokens cannot be "all ones": the embedding output is replaced by all ones on the active hidden
    features (the token, position and type tables carry no signal);
  - every norm keeps only its elementwise affine part, |scale| x + |bias| (LayerNorm of a constant
    vector is zero, and a scale-invariant norm makes the sum cancel to ~0 by Euler's theorem);
  - attention is uniform: with identical (all-ones) tokens every key is the same, so the attention
    of a model without rotary positions is uniform and the gradient of its logits is exactly zero.
    We evaluate the pass with zero query/key projections, which makes that exact for every model
    and removes float32 cancellation noise (the all-positive activations grow geometrically with
    depth, and softmax gradients of equal huge logits are pure rounding). Query and key kernels
    therefore contribute 0;
  - R sums the logits of the valid tokens. Every term is >= 0 (a positive network increasing in
    every |theta|); values grow geometrically with depth and width, and float32 overflows to inf
    on deep wide spaces (about 3e29 on the 6-layer ELM space, inf on its 12-layer one).
  The score sums |W| * dR/d|W| over the kernels: the derivative of R along the kernels, one
  forward-mode JVP (no backward pass, no per-parameter gradient). With every token equal to the
  same all-ones vector, a model whose blocks mix tokens only by attention
  (`blocks.equal_tokens_stay_equal`)
  computes the same logits at every token, so R is the number of valid tokens times R of a
  one-token sequence, and so is the score: it is computed on one token (the minibatch's tokens,
  positions and padding cannot change it). Models that convolve or transform along the sequence
  (FlexiBERT's DSC and LT blocks) run the whole minibatch, in `passes` slices (see
  `sequence_passes`) whose derivatives add up.
  """
  abs_state = jax.tree.map(jnp.abs, state)

  def output_sum(s, chunk):
    inputs, valid_BT = chunk
    model = nnx.merge(graphdef, s)
    for _, module in nnx.iter_modules(model):
      if isinstance(module, Norm):
        module.kind = 'nonorm'
      elif isinstance(module, Attention):
        for var in (module.q, module.k, module.q_bias, module.k_bias):
          if var is not None:
            var[...] = jnp.zeros_like(var[...])
    ones = lambda x, mask: jnp.ones_like(x) if mask is None else jnp.ones_like(x) * mask
    logits = _with_embedding(model, ones)(inputs, arch)
    return jnp.sum(logits * valid_BT[..., None])

  # sum over kernels of |W| * dR/d|W| is R's derivative along the kernels themselves: one
  # forward-mode pass (a JVP whose tangent is |W| on kernels and 0 elsewhere), no gradient.
  tangent = nnx.from_flat_state([
      (path, var.replace(var[...] if kernel_kind(path, var[...].ndim) is not None
                         else jnp.zeros_like(var[...])))
      for path, var in nnx.to_flat_state(abs_state)])
  along_kernels = lambda chunk: jax.jvp(lambda s: output_sum(s, chunk), (abs_state,),
                                        (tangent,))[1]

  if equal_tokens_stay_equal(nnx.merge(graphdef, state)):
    # One valid token (segment 1, position 0) stands for each of the minibatch's valid tokens.
    token = {k: jnp.full((1, 1), 1 if k == 'segment_ids' else 0, v.dtype)
             for k, v in inputs.items()}
    return jnp.sum(valid_BT.astype(jnp.float32)) * along_kernels(
        (token, jnp.ones((1, 1), valid_BT.dtype)))
  _, per_pass = _summed_over_passes(lambda chunk: (None, along_kernels(chunk)),
                                    (inputs, valid_BT), passes, None)
  return jnp.sum(per_pass.astype(jnp.float32))


def jacob_cov(j_BTD: jax.Array, valid_BT: jax.Array, hidden_D: jax.Array, k: float) -> jax.Array:
  """Jacobian covariance (Mellor et al. 2020, NASWOT v1), one row per sequence.

  J_b = d(sum of sequence b's valid-token logits) / d(embedding output of b), flattened over
  (valid tokens, active hidden features); each row is centred and scaled to unit norm over its own
  entries, the correlation matrix's eigenvalues lambda give -sum(log(lambda + k) + 1/(lambda + k)).
  (The FlexiBERT benchmark code takes the gradient of the position table instead; models with
  rotary or no positions have none, so we differentiate the embedding output directly.)
  """
  b = valid_BT.shape[0]
  m_BX = (valid_BT[:, :, None] * hidden_D[None, None, :]).reshape(b, -1)
  j_BX = j_BTD.reshape(b, -1).astype(jnp.float32) * m_BX
  count_B = jnp.maximum(jnp.sum(m_BX, axis=1, keepdims=True), 1.0)
  z_BX = (j_BX - jnp.sum(j_BX, axis=1, keepdims=True) / count_B) * m_BX
  z_BX = z_BX / jnp.maximum(jnp.linalg.norm(z_BX, axis=1, keepdims=True), 1e-30)
  corr_BxB = z_BX @ z_BX.T
  lam = jnp.maximum(jnp.linalg.eigvalsh(0.5 * (corr_BxB + corr_BxB.T)), 0.0)
  return -jnp.sum(jnp.log(lam + k) + 1.0 / (lam + k))


def backward_proxies(graphdef, state, arch, inputs, batch, names: tuple[str, ...],
                     jacob_k: float, passes: int = 1, capture: tuple[str, ...] = (),
                     forward: tuple[str, ...] = ()) -> tuple[dict[str, jax.Array], dict]:
  """The loss-gradient proxies and jacob_cov: one forward pass, one backward pass per quantity.

  Both differentiate the same logits: the loss gradient w.r.t. the parameters (cotangent dL/dlogits)
  and the jacobian w.r.t. the embedding output (cotangent 1 on valid tokens). When both are asked
  for, one forward pass serves both backward passes. The minibatch is differentiated in `passes`
  slices of sequences (see `sequence_passes`): the loss is a sum over sequences divided by the
  whole minibatch's weight, so the summed gradients are the minibatch's, and each sequence's
  jacobian comes from its own slice.

  The same forward pass serves the forward-only proxies `forward`: each slice's block features
  `capture` and logits go through `features.slice_statistics`, whose sums (softmax and head
  confidence) are added up over the slices and become scores, and whose kept features are returned
  for the whole minibatch (concatenated over the slices); so neither the [B, T, vocab] logits nor
  the attention probabilities are held for more than one slice. Returns (scores, kept features).
  """
  loss_names = tuple(n for n in names if n != 'jacob_cov')
  want_jacobian = 'jacob_cov' in names
  valid_BT = batch['valid']
  model0 = nnx.merge(graphdef, state)
  b, t = valid_BT.shape
  hidden_D = _hidden_mask(model0, arch)
  delta0 = jnp.zeros((b // passes, t, model0.dims.hidden), jnp.float32)
  weight = jnp.maximum(jnp.sum(batch['weights']), 1.0) if loss_names else None

  def run(s, delta_BTD, inputs):
    """(logits, captured features) with `delta_BTD` added to the embedding output."""
    model = _with_embedding(nnx.merge(graphdef, s), lambda x, mask: x + delta_BTD.astype(x.dtype))
    return features.logits_and_features(model, inputs, arch, capture)

  def one_pass(chunk):
    """(loss gradient or None, (jacobian [b / passes, T, D] or None, statistics' sums, kept
    features)) of one slice."""
    inputs, valid_BT, targets_BT, weights_BT = chunk

    def loss(logits_BTV):
      return token_cross_entropy(logits_BTV, targets_BT, weights_BT)[0] / weight

    # One forward pass, a backward pass per cotangent from its residuals. Not `jax.vmap(vjp)`
    # over the two cotangents: on XLA:CPU (jax 0.10) that gave the jacobian of 16 or more
    # sequences wrong by 8-30% (it then depended on the other cotangent; float64 and 8 sequences
    # were right; tests/proxies/test_proxies_masked_dense.py checks a 16 x 128 minibatch).
    if loss_names:
      logits, vjp, feats = jax.vjp(lambda s, d: run(s, d, inputs), state, delta0, has_aux=True)
    else:  # no parameter gradient: differentiate the embedding output only
      logits, vjp, feats = jax.vjp(lambda d: run(state, d, inputs), delta0, has_aux=True)
    grads = vjp(jax.grad(loss)(logits))[0] if loss_names else None
    j_BTD = vjp(jnp.broadcast_to(valid_BT[..., None], logits.shape))[-1] if want_jacobian \
        else None
    sums, kept = features.slice_statistics(forward, logits, feats, valid_BT)
    return grads, (j_BTD, sums, kept)

  chunk = (inputs, valid_BT, batch.get('targets', valid_BT), batch.get('weights', valid_BT))
  grads, (j_BTD, sums, kept) = _summed_over_passes(
      one_pass, chunk, passes, state if loss_names else None)
  # Per-slice outputs back to the whole minibatch: sums added up, sequences concatenated (a
  # captured kernel is the same in every slice).
  whole = lambda x: x.reshape((-1,) + x.shape[2:])
  out = features.mean_of_sums(jax.tree.map(lambda x: jnp.sum(x, axis=0), sums))
  if loss_names:
    out.update(loss_gradient_proxies(state, grads, loss_names))
  if want_jacobian:
    out['jacob_cov'] = jacob_cov(whole(j_BTD), valid_BT, hidden_D, jacob_k)
  kept = {k: [x[0] if k in PARAMETER_CAPTURES else whole(x) for x in v] for k, v in kept.items()}
  return out, kept


def sequence_passes(batch_size: int, per_pass: int) -> int:
  """How many slices a minibatch of `batch_size` sequences is differentiated in, at most
  `per_pass` sequences each (the largest divisor of `batch_size` not above it); 0 = one."""
  if per_pass <= 0 or per_pass >= batch_size:
    return 1
  size = max(d for d in range(1, per_pass + 1) if batch_size % d == 0)
  return batch_size // size


def _summed_over_passes(fn, chunk, passes: int, like):
  """Runs `fn(slice) -> (tree, stacked)` on `passes` equal slices of `chunk`'s leading (sequence)
  axis: returns (the float32 sum of the trees, shaped like `like`, whose None leaves stay None;
  the `stacked` outputs, each with a leading [passes] axis)."""
  sliced = jax.tree.map(lambda x: x.reshape((passes, x.shape[0] // passes) + x.shape[1:]), chunk)
  zero = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), like)
  return scan_sum(fn, zero, sliced)
