"""Forward-only proxies, from one forward pass with captured features: V-PCA (W-PCA's count), head
confidence, softmax confidence and activation distance.

Every function here works on one network and one batch, in traced code: the network is the masked
supernet with an `Arch` (then `jax.vmap` / `lax.map` over archs scores a population) or a dense
model (`arch=None`). Masked parts never change a score: inactive FFN columns and off layers
capture exact zeros (no variance; excluded from activation codes), inactive heads capture zero
attention rows (excluded from head confidence), so the masked supernet and the exported dense
model score the same (tested).

`valid_BT` (float 0/1) marks the tokens every statistic reads: all tokens, or the non-padding ones
(`proxy.padding`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from elastic_jax.config import BLOCK_TYPES
from elastic_jax.proxies.pca import input_scatter, linear_count, pca_count_linear

_BOTTLENECK = BLOCK_TYPES.index('bottleneck')


def logits_and_features(model, inputs, arch, capture: tuple[str, ...]) -> tuple[jax.Array, dict]:
  """(logits, the captured features): the model returns its logits alone when nothing is
  captured, and the features are then {}."""
  return model(inputs, arch, capture=capture) if capture else (model(inputs, arch), {})


def ffn_layers(model, arch) -> list[dict]:
  """Per layer: `units` float[F] (active FFN units), `bottleneck` float[] (1 if the layer's block
  is a bottleneck), `on` bool[], `ffn` (active width) and `ffn_in` (active width of the FFN's
  input: the hidden size, or a bottleneck's inner width).

  Masked supernet: units < arch.ffn of layers that are on. Dense model: every unit of every layer.
  """
  out = []
  if arch is None:
    for layer in model.dims.layers:
      bottleneck = layer.blocks[0] == 'bottleneck'
      out.append({'units': jnp.ones((layer.ffn,), jnp.float32),
                  'bottleneck': jnp.float32(bottleneck), 'on': jnp.bool_(True),
                  'ffn': layer.ffn, 'ffn_in': layer.inner if bottleneck else model.dims.hidden})
    return out
  on_L = arch.layer_on()
  for i, layer in enumerate(model.dims.layers):
    units = (jnp.arange(layer.ffn) < arch.ffn[i]) & on_L[i]
    bottleneck = arch.block[i] == _BOTTLENECK
    out.append({'units': units.astype(jnp.float32),
                'bottleneck': bottleneck.astype(jnp.float32), 'on': on_L[i],
                'ffn': arch.ffn[i], 'ffn_in': jnp.where(bottleneck, arch.inner[i], arch.hidden)})
  return out


def _sizes(choices, full):
  """The space's width choices that fit, and the full width (used by unlisted widths)."""
  sizes = tuple(sorted({c for c in choices if c <= full}))
  return sizes + (() if full in sizes else (full,))


def _index(sizes, value):
  match = jnp.asarray(sizes) == value
  return jnp.where(jnp.any(match), jnp.argmax(match), len(sizes) - 1)


def _count_by_width(scatter_DxD, n_valid, kernel_DxF, eta, layer, widths):
  """PCA count of one layer's FFN pre-activations on the active widths only, from the scatter
  matrix of its FFN input at the full width: `lax.switch` picks the first `ffn_in` rows and
  columns of it (the scatter matrix of the first `ffn_in` input columns) and the first `ffn`
  kernel columns among the space's choices (exact: the columns beyond are zeros, which add only
  zero eigenvalues); an off layer skips it. Outside `vmap` only the chosen branch executes, so a
  narrow layer costs its own O(width^3)."""
  d_sizes = _sizes(widths[0], scatter_DxD.shape[-1])
  f_sizes = _sizes(widths[1], kernel_DxF.shape[-1])
  branches = [lambda s, k: jnp.int32(0)]
  # Active columns only, so the kernel slice is normally full-rank and its Gram matrix is
  # factored (`pca.linear_count`; a rank-deficient one, e.g. a width outside the choices run
  # at the full width, falls back; lax.map runs one side of that choice).
  branches += [lambda s, k, d=d, f=f: linear_count(s[:d, :d], n_valid, k[:d, :f], eta,
                                                   factor_kernel=True)
               for d in d_sizes for f in f_sizes]
  chosen = 1 + _index(d_sizes, layer['ffn_in']) * len(f_sizes) + _index(f_sizes, layer['ffn'])
  return jax.lax.switch(jnp.where(layer['on'], chosen, 0), branches, scatter_DxD, kernel_DxF)


def _counts_by_layer(x_LxNxD, w_N, kernel_LxDxF, fields, eta, widths) -> jax.Array:
  """`_count_by_width` of every layer (equal shapes, stacked): the FFN inputs' scatter matrices
  first (on a mesh each device sums its own rows; the D x D results are all-reduced), then the
  counts in one `lax.map`, which holds each width's PCA once, not per layer. On a mesh of several
  devices each device counts its own share of the layers (`jax.shard_map` over the layer axis,
  padded with off layers) instead of every device repeating every layer's factorisations and
  eigendecompositions: ceil(L / devices) of them per device instead of L."""
  scatter_LxDxD, n_valid_L = jax.vmap(lambda x: input_scatter(x, w_N))(x_LxNxD)

  def count(scatter, n_valid, kernel, layer):
    return jax.lax.map(lambda a: _count_by_width(a[0], n_valid, a[1], eta, a[2], widths),
                       (scatter, kernel, layer))

  operands = (scatter_LxDxD, n_valid_L[0], kernel_LxDxF, fields)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return count(*operands)
  layers, pad = x_LxNxD.shape[0], -x_LxNxD.shape[0] % mesh.size
  padded = jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]),
                        (scatter_LxDxD, kernel_LxDxF, fields))  # padding: off layers, count 0
  split, whole = PartitionSpec(tuple(mesh.axis_names)), PartitionSpec()
  counts = jax.shard_map(count, mesh=mesh, in_specs=(split, whole, split, split),
                         out_specs=split, check_vma=False)(padded[0], operands[1], *padded[1:])
  return counts[:layers]


def vpca(ffn_in: list[jax.Array], ffn_kernel: list[jax.Array], valid_BT: jax.Array, layers,
         eta: float, bottleneck_ffn: str, widths: tuple | None = None) -> jax.Array:
  """V-PCA: sum over FFN layers of the PCA count of the first linear's pre-activations reshaped
  to (tokens, width), computed from the FFN input and kernel (`pca.pca_count_linear`: exact, and
  cheaper than forming the pre-activations' covariance). Off layers count 0.

  With `widths` (the space's (FFN input width choices, FFN width choices); masked supernet, archs
  one at a time) each PCA runs at its layer's active widths (`_count_by_width`); the layers of
  each shape run together (`_counts_by_layer`: one `lax.map`, split over the devices of a mesh).
  """
  if not ffn_in:
    return jnp.float32(0.0)
  w_N = valid_BT.reshape(-1)
  xs = [x_BTD.reshape(-1, x_BTD.shape[-1]) for x_BTD in ffn_in]
  if widths is None:  # a dense model, or vmapped archs (masked columns are exact zeros)
    counts = [pca_count_linear(x, k, eta, w_N) for x, k in zip(xs, ffn_kernel)]
  else:  # layers of equal shapes together
    groups: dict[tuple, list[int]] = {}
    for i, (x, k) in enumerate(zip(xs, ffn_kernel)):
      groups.setdefault((x.shape, k.shape), []).append(i)
    counts = [None] * len(xs)
    for members in groups.values():
      fields = {f: jnp.stack([jnp.asarray(layers[i][f]) for i in members])
                for f in ('on', 'ffn_in', 'ffn')}
      group = _counts_by_layer(jnp.stack([xs[i] for i in members]), w_N,
                               jnp.stack([ffn_kernel[i] for i in members]), fields, eta, widths)
      for j, i in enumerate(members):
        counts[i] = group[j]
  k_L = jnp.stack(counts).astype(jnp.float32)
  if bottleneck_ffn == 'exclude':
    k_L = k_L * (1.0 - jnp.stack([layer['bottleneck'] for layer in layers]))
  return jnp.sum(k_L)


def head_confidence_sums(attn_probs: list[jax.Array], valid_BT: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Head confidence (Voita et al. 2019: the mean over active heads of all layers and valid query
  tokens of the largest attention probability) as (sum, count): sums over slices of a minibatch
  add up to the minibatch's. A head is active where its probabilities sum to 1; the masked
  supernet's inactive heads and off layers capture zero rows."""
  num, den = jnp.float32(0.0), jnp.float32(0.0)
  for p_BNTS in attn_probs:
    p_BNTS = p_BNTS.astype(jnp.float32)
    active_BNT = (jnp.sum(p_BNTS, axis=-1) > 0.5).astype(jnp.float32)
    w_BNT = active_BNT * valid_BT[:, None, :]
    num = num + jnp.sum(jnp.max(p_BNTS, axis=-1) * w_BNT)
    den = den + jnp.sum(w_BNT)
  return num, den


def softmax_confidence_sums(logits_BTV: jax.Array, valid_BT: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
  """Softmax confidence (the mean over valid tokens of the largest output probability) as
  (sum, count), like `head_confidence_sums`."""
  p_max_BT = jnp.max(jax.nn.softmax(logits_BTV.astype(jnp.float32), axis=-1), axis=-1)
  return jnp.sum(p_max_BT * valid_BT), jnp.sum(valid_BT)


def slice_statistics(names, logits_BTV: jax.Array | None, feats: dict, valid_BT: jax.Array
                     ) -> tuple[dict, dict]:
  """What one slice of a minibatch leaves for the forward-only proxies `names`: ({proxy: (sum,
  count)} to add up over the slices (`mean_of_sums`), the captured features the whole minibatch's
  statistics need). Attention probabilities are reduced here and the FFN pre-activations kept
  only as their signs (`activation_distance`'s unit codes), so neither outlives its slice."""
  sums, kept = {}, dict(feats)
  if 'softmax_confidence' in names:
    sums['softmax_confidence'] = softmax_confidence_sums(logits_BTV, valid_BT)
  if 'head_confidence' in names:
    sums['head_confidence'] = head_confidence_sums(kept.pop('attn_probs'), valid_BT)
  if 'ffn_pre' in kept:
    kept['ffn_on'] = [h > 0 for h in kept.pop('ffn_pre')]
  return sums, kept


def mean_of_sums(sums: dict) -> dict:
  """{proxy: sum / count} of `slice_statistics`' (summed) sums."""
  return {k: num / jnp.maximum(den, 1.0) for k, (num, den) in sums.items()}


def activation_distance(ffn_on: list[jax.Array], valid_BT: jax.Array, layers) -> jax.Array:
  """NASWOT (Mellor et al. 2021) log|K| with one binary code per *sequence*.

  `ffn_on` (bool [B, T, F] per layer): a unit is on where its pre-activation is > 0 (ReLU and
  GELU outputs are positive exactly there; for SwiGLU it is the gate's sign). Sequence b's code
  lists every (valid token, active FFN unit) of every layer; K[a, b] = number of those positions
  where a and b agree (= N_A - Hamming distance), computed as C C^T + (1 - C)(1 - C)^T over the
  masked codes, so masked units and padding count in neither. Identical codes give a singular K
  and -inf. Per-sequence codes, not per-token: in a causal model two sequences that start with
  the same token give identical first-token codes and a singular K.
  """
  b = valid_BT.shape[0]
  k_BxB = jnp.zeros((b, b), jnp.float32)
  for on_BTF, layer in zip(ffn_on, layers):
    m_BTF = valid_BT[:, :, None] * layer['units'][None, None, :]
    on_BTF = on_BTF.astype(jnp.float32)
    p_BX = (m_BTF * on_BTF).reshape(b, -1)
    q_BX = (m_BTF * (1.0 - on_BTF)).reshape(b, -1)
    k_BxB = k_BxB + p_BX @ p_BX.T + q_BX @ q_BX.T
  # A sequence with no code (no valid token, or a network without FFN units) has an all-zero
  # row: give it a unit diagonal, which adds log 1 = 0 (a network without FFN layers scores 0).
  empty_B = (jnp.diagonal(k_BxB) == 0).astype(jnp.float32)
  return jnp.linalg.slogdet(k_BxB + jnp.diag(empty_B))[1]
