"""Reorder a model's units by importance without changing what it computes.

Every elastic dimension of the space is a prefix, so after sorting each axis by decreasing
importance, every prefix the space can choose keeps the most important units. A unit appears in
several arrays (a hidden channel in every norm's scale and bias, the embeddings, positions, every
projection's input or output and a tied vocabulary projection; a head in q, o and their biases; a
KV group in k, v and theirs; an FFN neuron in up, gate, down and their biases); the parameters'
logical axis names (`embed`, `heads`, `kv`, `mlp`) say which, so one rule permutes them all:
  hidden channels  every `embed` / `embed_out` axis of every parameter (LayerNorm and RMSNorm
                   statistics are permutation invariant, so the function is unchanged)
  query heads      the `heads` axis of layer i's parameters, in whole KV groups: group order by
                   group score, then heads by score within each group (head n reads group
                   n // heads-per-group before and after)
  KV groups        the `kv` axis, in the same group order
  FFN neurons      the `mlp` axis of layer i
Head features (the `head_dim` axis) are not reordered: the rotary frequency of a feature pair
depends on its index, so even moving whole pairs would change the function, and the imported
spaces keep the head size fixed. Layers are not reordered either (that changes the function):
their importance ranking is saved and used where layers are dropped (the pruning baselines).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from elastic_jax import export as export_lib
from elastic_jax.compress.importance import HIDDEN_AXES, Scores, axis_names
from elastic_jax.errors import UserError
from elastic_jax.model.supernet import Model


@dataclasses.dataclass
class Permutation:
  """New position -> old index, per axis (the first entries are the most important units)."""

  hidden: np.ndarray
  heads: list[np.ndarray]
  groups: list[np.ndarray]
  ffn: list[np.ndarray]


def _descending(scores: np.ndarray) -> np.ndarray:
  """Indices by decreasing score; ties keep their original order (deterministic)."""
  return np.argsort(-np.asarray(scores, np.float64), kind='stable')


def from_scores(scores: Scores) -> Permutation:
  heads, groups = [], []
  for head_scores, group_scores in zip(scores.heads, scores.groups):
    n, g = len(head_scores), len(group_scores)
    if n % g:
      raise UserError(f'{n} query heads cannot be split into {g} KV groups')
    per_group = n // g
    group_order = _descending(group_scores)
    order = [grp * per_group + _descending(head_scores[grp * per_group:(grp + 1) * per_group])
             for grp in group_order]
    heads.append(np.concatenate(order))
    groups.append(group_order)
  return Permutation(hidden=_descending(scores.hidden), heads=heads, groups=groups,
                     ffn=[_descending(f) for f in scores.ffn])


def identity(model: Model) -> Permutation:
  dims = model.dims
  return Permutation(hidden=np.arange(dims.hidden),
                     heads=[np.arange(l.heads) for l in dims.layers],
                     groups=[np.arange(l.kv_groups) for l in dims.layers],
                     ffn=[np.arange(l.ffn) for l in dims.layers])


def reorder(value, names: tuple, index_of, where: str = 'a parameter') -> np.ndarray:
  """`value` with every axis whose logical name `index_of(name)` knows (an index array, else
  None) taken in that order (parameters, and optimizer moments shaped like them)."""
  value = np.asarray(value)
  for axis, name in enumerate(names):
    index = index_of(name)
    if index is None:
      continue
    if len(index) != value.shape[axis]:
      raise UserError(f'{where} axis {name!r} has size {value.shape[axis]}, the permutation '
                      f'{len(index)}')
    value = np.take(value, index, axis=axis)
  return value


def apply(model: Model, perm: Permutation) -> Model:
  """A new model whose units are reordered by `perm` (a dense model or a supernet)."""
  values = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    def index_of(name, path=path):
      if name in HIDDEN_AXES:
        return perm.hidden
      if name not in ('heads', 'kv', 'mlp'):
        return None
      if path[0] != 'layers':
        raise UserError(f'parameter {export_lib.param_key(path)} has a per-layer axis {name!r} '
                        'outside the layers; it cannot be sorted')
      return {'heads': perm.heads, 'kv': perm.groups, 'mlp': perm.ffn}[name][path[1]]
    values[path] = reorder(var[...], axis_names(var), index_of,
                           f'parameter {export_lib.param_key(path)}')
  return export_lib.fill_model(export_lib.abstract_model(model.cfg, model.dims), values)


def layer_order(scores: Scores) -> list[int]:
  """Layers from most to least important."""
  return [int(i) for i in _descending(scores.layers)]
