"""Importance of every prunable unit of a dense model, from a few calibration batches.

Units and their scores (higher = more important), in the style of Minitron (Muralidharan et al.
2024) and whittle:
  hidden   [D]      embedding channels: mean |x| of every norm's output (pre-norm: each layer's
                    attention and FFN norm and the final norm; post-norm: the embedding norm and
                    both norms of each layer), summed over the norms
  heads    [L][N]   attention heads: mean L2 norm of the head's contribution to the attention
                    output (its context through its slice of the output projection)
  groups   [L][G]   KV groups: the sum of their query heads' scores (grouped-query heads move
                    with their group)
  ffn      [L][F]   FFN neurons: mean |activation| x L2 norm of the neuron's down-projection row,
                    the size of its contribution to the FFN output
  layers   [L]      'cosine': mean over tokens of 1 - cos(layer input, layer output);
                    'loss': calibration loss with the layer removed minus the full model's
`method='taylor'` replaces the width scores by first-order Taylor estimates of the loss change
when a unit is removed, |sum over the unit's parameters of gradient x weight| (summed over the
calibration batches); hidden channels collect every parameter on the hidden axis, KV groups their
own k/v parameters plus their query heads'.

Units are found by the parameters' logical axis names (`embed`, `heads`, `kv`, `mlp`), the same
names the sharding rules use, so no family needs its own code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elastic_jax import export as export_lib
from elastic_jax.config import ModelDims
from elastic_jax.errors import UserError
from elastic_jax.evaluation import model_inputs
from elastic_jax.losses import token_cross_entropy
from elastic_jax.model.supernet import Model

METHODS = ('activation', 'taylor')
LAYER_METHODS = ('cosine', 'loss')
HIDDEN_AXES = ('embed', 'embed_out')  # the pooler's output is on the hidden axis too
LAYER_AXES = {'heads': 'heads', 'kv': 'groups', 'mlp': 'ffn'}


@dataclasses.dataclass
class Scores:
  """Importance of each unit (higher = keep); lists hold one array per layer."""

  hidden: np.ndarray
  heads: list[np.ndarray]
  groups: list[np.ndarray]
  ffn: list[np.ndarray]
  layers: np.ndarray
  method: str = 'activation'
  layer_method: str = 'cosine'
  tokens: int = 0

  def to_arrays(self) -> dict[str, np.ndarray]:
    out = {'hidden': self.hidden, 'layers': self.layers}
    for name in ('heads', 'groups', 'ffn'):
      for i, v in enumerate(getattr(self, name)):
        out[f'{name}_{i}'] = v
    return out

  @classmethod
  def from_arrays(cls, arrays, **meta) -> Scores:
    n = len(arrays['layers'])
    per = {k: [np.asarray(arrays[f'{k}_{i}']) for i in range(n)]
           for k in ('heads', 'groups', 'ffn')}
    return cls(hidden=np.asarray(arrays['hidden']), layers=np.asarray(arrays['layers']), **per,
               **meta)


def axis_names(var) -> tuple:
  return tuple(var.get_metadata().get('out_sharding') or (None,) * var.ndim)


def check_calibration(batches: Sequence[dict], min_tokens: int) -> int:
  """The number of calibration tokens (UserError when below `min_tokens`)."""
  tokens = int(sum(np.sum(np.asarray(b.get('segment_ids', np.ones_like(b['tokens']))) != 0)
                   for b in batches))
  if tokens < min_tokens:
    raise UserError(f'the calibration set has {tokens} tokens, fewer than the {min_tokens} '
                    'importance scores need; raise compress.calibration_batches (or '
                    'data.batch_size / data.seq_len), or lower compress.min_calibration_tokens')
  return tokens


def _token_mask(batch) -> jax.Array:
  seg = batch.get('segment_ids')
  return jnp.ones(batch['tokens'].shape, jnp.float32) if seg is None else (seg != 0).astype(
      jnp.float32)


CAPTURES = ('embed', 'hidden', 'attn_in', 'attn_heads', 'ffn_in', 'ffn_act')


@functools.partial(jax.jit, static_argnums=0)
def _activation_sums(graphdef, state, batch):
  """Per-batch sums of the activation scores (dict of arrays; per-layer entries stacked)."""
  model = nnx.merge(graphdef, state)
  _, feats = model(model_inputs(batch), None, CAPTURES)
  mask_BT = _token_mask(batch)
  abs_sum = lambda x: jnp.einsum('BTD,BT->D', jnp.abs(x.astype(jnp.float32)), mask_BT)
  if model.cfg.norm_placement == 'pre':
    final = model.head.normed(feats['hidden'][-1], None, model.dims.hidden)
    norm_outputs = list(feats['attn_in']) + list(feats['ffn_in']) + [final]
  else:
    norm_outputs = [feats['embed']] + list(feats['ffn_in']) + list(feats['hidden'])
  hidden = sum(abs_sum(x) for x in norm_outputs)
  heads, ffn, layers = [], [], []
  inputs = [feats['embed']] + list(feats['hidden'][:-1])
  for i, layer in enumerate(model.layers):
    block = layer.blocks['transformer']
    o_NHD = block.attn.o[...].astype(jnp.float32)
    y_BTND = jnp.einsum('BTNH,NHD->BTND', feats['attn_heads'][i].astype(jnp.float32), o_NHD)
    heads.append(jnp.einsum('BTN,BT->N', jnp.linalg.norm(y_BTND, axis=-1), mask_BT))
    down_norm_F = jnp.linalg.norm(block.mlp.down[...].astype(jnp.float32), axis=-1)
    ffn.append(abs_sum(feats['ffn_act'][i]) * down_norm_F)
    x_in, x_out = inputs[i].astype(jnp.float32), feats['hidden'][i].astype(jnp.float32)
    cos_BT = jnp.sum(x_in * x_out, -1) / (jnp.linalg.norm(x_in, axis=-1)
                                          * jnp.linalg.norm(x_out, axis=-1) + 1e-12)
    layers.append(jnp.sum((1.0 - cos_BT) * mask_BT))
  return {'hidden': hidden, 'heads': heads, 'ffn': ffn, 'layers': jnp.stack(layers),
          'tokens': jnp.sum(mask_BT)}


def _mean_loss(model, batch):
  logits = model(model_inputs(batch))
  loss, weight = token_cross_entropy(logits, batch['targets'], batch['weights'])
  return loss / jnp.maximum(weight, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _taylor_terms(graphdef, params, rest, batch):
  """gradient x weight of every parameter, for one batch."""
  def loss_fn(p):
    return _mean_loss(nnx.merge(graphdef, p, rest), batch)
  grads = jax.grad(loss_fn)(params)
  return jax.tree.map(lambda g, w: g * w, grads, params)


@functools.partial(jax.jit, static_argnums=0)
def _loss(graphdef, state, batch):
  return _mean_loss(nnx.merge(graphdef, state), batch)


def _group_of_heads(scores_N: np.ndarray, groups: int) -> np.ndarray:
  return scores_N.reshape(groups, -1).sum(axis=1)


def _taylor_scores(model: Model, batches) -> dict:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat_vars = dict(nnx.to_flat_state(params))
  dims = model.dims
  out = {'hidden': np.zeros(dims.hidden),
         'heads': [np.zeros(l.heads) for l in dims.layers],
         'kv': [np.zeros(l.kv_groups) for l in dims.layers],
         'ffn': [np.zeros(l.ffn) for l in dims.layers]}
  for batch in batches:
    terms = dict(nnx.to_flat_state(_taylor_terms(graphdef, params, rest, batch)))
    per_batch = {'hidden': np.zeros(dims.hidden),
                 'heads': [np.zeros(l.heads) for l in dims.layers],
                 'kv': [np.zeros(l.kv_groups) for l in dims.layers],
                 'ffn': [np.zeros(l.ffn) for l in dims.layers]}
    for path, term in terms.items():
      gw = np.asarray(term[...] if hasattr(term, 'get_metadata') else term, np.float64)
      names = axis_names(flat_vars[path])
      for axis, name in enumerate(names):
        other = tuple(a for a in range(gw.ndim) if a != axis)
        if name in HIDDEN_AXES:
          per_batch['hidden'] += gw.sum(axis=other)
        elif name in ('heads', 'kv', 'mlp') and path[0] == 'layers':
          key = {'heads': 'heads', 'kv': 'kv', 'mlp': 'ffn'}[name]
          per_batch[key][path[1]] += gw.sum(axis=other)
    out['hidden'] += np.abs(per_batch['hidden'])
    for i, l in enumerate(dims.layers):
      # A group's removal takes its query heads along: its own k/v terms plus theirs.
      per_batch['kv'][i] += _group_of_heads(per_batch['heads'][i], l.kv_groups)
      for key in ('heads', 'kv', 'ffn'):
        out[key][i] += np.abs(per_batch[key][i])
  return out


def _dense_without_layer(model: Model, drop: int) -> Model:
  """The dense model with layer `drop` removed (the residual stream skips it)."""
  dims = model.dims
  kept = [i for i in range(len(dims.layers)) if i != drop]
  new_dims = ModelDims(hidden=dims.hidden, head_dim=dims.head_dim,
                       bottleneck_head_dim=dims.bottleneck_head_dim,
                       layers=tuple(dims.layers[i] for i in kept))
  params = export_lib.flat_params(model)
  values = {}
  for path, _ in nnx.to_flat_state(nnx.state(export_lib.abstract_model(model.cfg, new_dims),
                                              nnx.Param)):
    values[path] = params[(path[0], kept[path[1]]) + path[2:] if path[0] == 'layers' else path]
  return export_lib.fill_model(export_lib.abstract_model(model.cfg, new_dims), values)


def layer_loss_increase(model: Model, batches) -> np.ndarray:
  """[L] mean calibration loss with each layer removed, minus the full model's."""
  def mean_loss(m):
    graphdef, state = nnx.split(m)
    return float(np.mean([float(_loss(graphdef, state, b)) for b in batches]))
  base = mean_loss(model)
  return np.asarray([mean_loss(_dense_without_layer(model, i)) - base
                     for i in range(len(model.dims.layers))])


def compute(model: Model, batches: Sequence[dict], *, method: str = 'activation',
            layer_method: str = 'cosine') -> Scores:
  """Importance scores of the dense `model`'s units on `batches` (training-format batches)."""
  if method not in METHODS:
    raise UserError(f'config field compress.importance={method!r} is invalid; allowed values are '
                    f'{list(METHODS)}')
  if layer_method not in LAYER_METHODS:
    raise UserError(f'config field compress.layer_importance={layer_method!r} is invalid; allowed'
                    f' values are {list(LAYER_METHODS)}')
  kinds = {k for l in model.dims.layers for k in l.blocks}
  if kinds != {'transformer'}:
    raise UserError(f'importance sorting supports transformer blocks only; this model has '
                    f'{sorted(kinds)}')
  graphdef, state = nnx.split(model)
  total, tokens = None, 0.0
  for batch in batches:
    sums = jax.tree.map(np.asarray, _activation_sums(graphdef, state, batch))
    tokens += float(sums.pop('tokens'))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  n = max(tokens, 1.0)
  dims = model.dims
  hidden = total['hidden'] / n
  heads = [h / n for h in total['heads']]
  ffn = [f / n for f in total['ffn']]
  groups = [_group_of_heads(h, l.kv_groups) for h, l in zip(heads, dims.layers)]
  if method == 'taylor':
    t = _taylor_scores(model, batches)
    hidden, heads, groups, ffn = t['hidden'], t['heads'], t['kv'], t['ffn']
  layers = (total['layers'] / n if layer_method == 'cosine'
            else layer_loss_increase(model, batches))
  f64 = lambda x: np.asarray(x, np.float64)
  return Scores(hidden=f64(hidden), heads=[f64(h) for h in heads],
                groups=[f64(g) for g in groups], ffn=[f64(f) for f in ffn],
                layers=f64(layers), method=method, layer_method=layer_method, tokens=int(tokens))
