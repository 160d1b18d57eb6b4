"""The search space an imported model becomes the largest sub-network of.

Every elastic dimension's choices are fractions of the original's size (the `hf` config section),
rounded so that the space stays valid: hidden and FFN widths to multiples of `round_to`, query
heads to multiples of the original's heads per KV group (so grouped-query heads move by whole
groups), KV groups and depth to whole numbers >= 1. 1.0 is always a choice, so the original is
the largest sub-network and the supernet's arrays have exactly its shapes.
"""

from __future__ import annotations

import math

import ml_collections

from elastic_jax.errors import UserError
from elastic_jax.hf.layout import Shape


def default_config() -> ml_collections.ConfigDict:
  """The `hf` section of an import config, every field commented."""
  c = ml_collections.ConfigDict()
  c.source = ''  # the Hugging Face directory the workdir was imported from (recorded)
  # Choices of each elastic dimension, as fractions of the original model's size.
  c.hidden = (0.5, 0.75, 1.0)  # global hidden size
  c.heads = (0.5, 0.75, 1.0)  # query heads per layer (whole KV groups of them)
  c.kv_groups = (0.5, 1.0)  # KV groups per layer (grouped-query models only)
  c.ffn = (0.25, 0.5, 0.75, 1.0)  # FFN width per layer
  c.depth = (0.5, 0.75, 1.0)  # kept prefix of layers
  c.layer_subsets = False  # also allow removing any layer (the 'skip' block), as whittle does
  c.round_to = 8  # hidden and FFN choices are multiples of this (or the original size)
  return c


def _fractions(field: str, values) -> list[float]:
  values = [float(v) for v in values]
  if not values or any(not 0 < v <= 1 for v in values):
    raise UserError(f'config field hf.{field}={values} is invalid: fractions must lie in (0, 1]')
  return sorted(set(values) | {1.0})


def _widths(field: str, fractions, full: int, round_to: int) -> tuple[int, ...]:
  out = {full}
  for f in _fractions(field, fractions):
    out.add(max(round_to, round(full * f / round_to) * round_to) if full >= round_to else full)
  return tuple(sorted(w for w in out if w <= full))


def derive(shape: Shape, hf: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `space` section for an original of `shape`."""
  round_to = int(hf.round_to)
  if round_to < 1:
    raise UserError(f'config field hf.round_to={round_to} is invalid: must be >= 1')
  gqa = shape.kv_groups != shape.heads
  per_group = shape.heads // shape.kv_groups
  heads = sorted({max(per_group, round(shape.heads * f / per_group) * per_group)
                  for f in _fractions('heads', hf.heads)})
  space = ml_collections.ConfigDict()
  space.num_layers = shape.num_layers
  space.hidden = _widths('hidden', hf.hidden, shape.hidden, round_to)
  space.depth = tuple(sorted({max(1, math.ceil(shape.num_layers * f))
                              for f in _fractions('depth', hf.depth)}))
  space.blocks = ('transformer', 'skip') if hf.layer_subsets else ('transformer',)
  space.heads = tuple(heads)
  space.kv_groups = (tuple(sorted({max(1, round(shape.kv_groups * f))
                                   for f in _fractions('kv_groups', hf.kv_groups)}))
                     if gqa else ())
  space.head_dim = (shape.head_dim,)
  space.ffn = _widths('ffn', hf.ffn, shape.ffn, round_to)
  return space


def original_arch(shape: Shape, num_layers: int) -> dict:
  """The JSON arch of the original model (in a space of `num_layers` >= its depth)."""
  layer = {'block': 'transformer', 'heads': shape.heads, 'kv_groups': shape.kv_groups,
           'ffn': shape.ffn, 'inner': 0}
  return {'hidden': shape.hidden, 'depth': shape.num_layers, 'head_dim': shape.head_dim,
          'layers': [dict(layer) for _ in range(num_layers)]}
