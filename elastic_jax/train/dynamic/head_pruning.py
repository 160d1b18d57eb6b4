"""CKA head pruning (ELM): redundant attention heads leave the allowed head counts.

For each layer and attention block type (transformer, bottleneck), the largest allowed arch with
every layer of that type runs on the calibration batch and each head's output (its context
through its slice of the output projection, the `attn_head_out` capture) is compared with every
other head's by linear CKA (Kornblith et al. 2019):

  CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)   on column-centred token x feature X, Y,

which equals HSIC(XX^T, YY^T) / sqrt(HSIC(XX^T, XX^T) HSIC(YY^T, YY^T)). Going through the kept
heads in order, a head whose CKA with an earlier kept head exceeds the threshold is dropped; then,
where `heads_divide_width`, the last kept heads are dropped until their count divides the block's
width. The dropped heads' weights are permuted behind the kept ones (the parameters and the
optimizer's moments alike, with elastic_jax/compress/permute.py's `reorder`), so the kept heads
are a prefix and every head count up to theirs is a sub-network of them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elastic_jax.compress.importance import axis_names
from elastic_jax.compress.permute import reorder
from elastic_jax.evaluation import model_inputs
from elastic_jax.proxies.pca import centred
from elastic_jax.train.step import valid_tokens

ATTENTION_BLOCKS = ('transformer', 'bottleneck')


def linear_cka(x_NxD: jax.Array, y_NxE: jax.Array, w_N: jax.Array | None = None) -> jax.Array:
  """Linear CKA of two representations of the same N rows (`w_N`: 1 = row used); 0 when either
  has no variance."""
  x, _ = centred(x_NxD, w_N)
  y, _ = centred(y_NxE, w_N)
  xy = jnp.sum(jnp.square(x.T @ y))
  xx = jnp.sqrt(jnp.sum(jnp.square(x.T @ x)))
  yy = jnp.sqrt(jnp.sum(jnp.square(y.T @ y)))
  den = xx * yy
  return jnp.where(den > 0, xy / jnp.where(den > 0, den, 1.0), 0.0)


def head_cka(h_NxHxD: jax.Array, w_N: jax.Array | None = None) -> jax.Array:
  """float32[H, H]: linear CKA between every pair of heads' outputs (rows: tokens)."""
  x_HxNxD = jax.vmap(lambda h: centred(h, w_N)[0], in_axes=1)(h_NxHxD)
  cross_HxGxDxE = jnp.einsum('hnd,gne->hgde', x_HxNxD, x_HxNxD)
  hsic_HxG = jnp.sum(jnp.square(cross_HxGxDxE), axis=(2, 3))
  norm_H = jnp.sqrt(jnp.diagonal(hsic_HxG))
  den = norm_H[:, None] * norm_H[None, :]
  return jnp.where(den > 0, hsic_HxG / jnp.where(den > 0, den, 1.0), 0.0)


def make_head_cka(graphdef):
  """cka(model_params, batch, archs) -> float32[A, L, H, H] per probe arch (growth.probe_archs).
  One jitted function keyed by the model's structure, as `growth.make_measure`."""
  return functools.partial(_head_cka_of_archs, graphdef=graphdef)


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _head_cka_of_archs(params, batch, archs, *, graphdef):
  model = nnx.merge(graphdef, params)
  w_N = valid_tokens(batch).reshape(-1)

  def one(arch):
    feats = model.features(model_inputs(batch), arch, ('attn_head_out',))
    return jnp.stack([head_cka(h.reshape((-1,) + h.shape[2:]).astype(jnp.float32), w_N)
                      for h in feats['attn_head_out']])

  return jax.lax.map(one, archs)


def choose_heads(cka_HxH: np.ndarray, active: int, threshold: float, width: int | None
                 ) -> tuple[list[int], list[int]]:
  """(kept, dropped) among heads [0, active): greedy in head order; `width`: lower the kept count
  until it divides it (None = no such requirement)."""
  kept, dropped = [], []
  for k in range(active):
    if any(cka_HxH[j, k] > threshold for j in kept):
      dropped.append(k)
    else:
      kept.append(k)
  while width and len(kept) > 1 and width % len(kept):
    dropped.insert(0, kept.pop())
  return kept, sorted(dropped)


def _keys(path) -> tuple:
  out = []
  for k in path:
    out.append(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', None))))
  return tuple(out)


def param_names(abstract_params) -> dict:
  """{param path: logical axis names} of a supernet's (abstract) parameters."""
  return {tuple(path): axis_names(var) for path, var in nnx.to_flat_state(abstract_params)}


def permute_heads(tree, names: dict, layer: int, kind: str, order: np.ndarray):
  """`tree` (the training parameters {'model', 'proj'}, or an optimizer state holding moments of
  them) with layer `layer`'s `kind` attention heads (and, multi-head, their KV groups) taken in
  `order` (new position -> old head)."""
  prefix = ('layers', layer, 'blocks', kind, 'attn')
  index_of = lambda name: order if name in ('heads', 'kv') else None

  def fn(path, leaf):
    keys = _keys(path)
    if 'model' not in keys:
      return leaf
    keys = keys[keys.index('model') + 1:]
    if keys and keys[-1] == 'value':
      keys = keys[:-1]
    if keys[:len(prefix)] != prefix or keys not in names:
      return leaf
    return jnp.asarray(reorder(leaf, names[keys], index_of, f'parameter {keys}'), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fn, tree)
