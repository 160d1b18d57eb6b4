"""Structural-pruning baselines: the sub-network a fixed rule picks at a parameter count, using
the importance scores but no search (Minitron-style width and depth pruning).

The rule: among *uniform* architectures (every kept layer has the same heads, KV groups and FFN
width) at every hidden size, keeping the k most important layers (by the sort's layer ranking
when the space may drop any layer, else the first k), take the one with the most parameters not
above the target (ties: more layers, then wider FFN). Because the weights are importance-sorted,
its prefixes are the highest-scoring units: this is pruning by importance, with the shape chosen
by size alone instead of by measured loss.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np

from elastic_jax import arch as arch_lib
from elastic_jax.errors import UserError
from elastic_jax.space import Space


def kept_layers(space: Space, layer_order: list[int], k: int) -> list[int] | None:
  """The layers a k-layer pruned model keeps, or None if the space cannot express it."""
  cfg = space.cfg
  if 'skip' in cfg.blocks:
    return sorted(layer_order[:k])
  return list(range(k)) if k in cfg.depth else None


def candidates(space: Space, layer_order: list[int]) -> list[dict]:
  """Every uniform architecture the rule considers (JSON form)."""
  cfg = space.cfg
  out = []
  kv_choices = cfg.kv_groups or (None,)
  for k in range(1, cfg.num_layers + 1):
    keep = kept_layers(space, layer_order, k)
    if keep is None:
      continue
    depth = max(keep) + 1 if 'skip' in cfg.blocks else k
    if depth not in cfg.depth:
      depth = min(d for d in cfg.depth if d >= max(keep) + 1)
    for hidden, heads, kv, ffn in itertools.product(cfg.hidden, cfg.heads, kv_choices, cfg.ffn):
      kv = heads if kv is None else kv
      if heads % kv:
        continue
      layers = []
      for i in range(cfg.num_layers):  # a space without 'skip' ends at `depth` instead
        block = 'transformer' if i in keep or 'skip' not in cfg.blocks else 'skip'
        layers.append({'block': block, 'heads': heads, 'kv_groups': kv, 'ffn': ffn, 'inner': 0})
      out.append({'hidden': hidden, 'depth': depth, 'head_dim': max(cfg.head_dim),
                  'layers': layers})
  return out


class PruningRule:
  """The rule over one space and layer ranking: every uniform candidate and its parameter count,
  computed once, then picked from at any number of targets."""

  def __init__(self, space: Space, layer_order: list[int]):
    self.archs = candidates(space, layer_order)
    stacked = arch_lib.stack([arch_lib.from_json(a, space.cfg) for a in self.archs])
    self.params = np.asarray(jax.vmap(lambda a: space.cost(a)['params'])(stacked))
    layers = np.asarray([sum(l['block'] != 'skip' for l in a['layers'][:a['depth']])
                         for a in self.archs])
    ffn = np.asarray([a['layers'][0]['ffn'] for a in self.archs])
    # best first: most parameters, then more layers, then wider FFN
    self.order = np.lexsort((ffn, layers, self.params))[::-1]

  def pick(self, max_params: float) -> tuple[dict, int]:
    """(JSON arch, parameters) of the pruned model at `max_params`."""
    ok = self.params <= max_params
    if not ok.any():
      raise UserError(f'no pruned model has <= {max_params:,.0f} parameters: the smallest uniform '
                      f'one has {int(self.params.min()):,}; raise the budget')
    best = next(i for i in self.order if ok[i])
    return self.archs[best], int(self.params[best])

  def seeds(self, targets, limit: int) -> list[dict]:
    """The pruned models at `targets` (parameter counts, in order; those no uniform model meets
    are passed over), each shape once, at most `limit`: starting points for the search."""
    out = []
    for target in targets:
      try:
        arch_json = self.pick(target)[0]
      except UserError:
        continue
      if arch_json not in out:
        out.append(arch_json)
      if len(out) == limit:
        break
    return out

  def shapes_near(self, target: float, low: float, limit: int) -> list[tuple[dict, int]]:
    """(JSON arch, parameters) of the uniform models with `low` * target to target parameters,
    one per width (hidden, heads, KV groups, FFN), each with as many of the most important layers
    as fit: the shapes among which measured loss, not size alone, picks (compress.anchors='loss').
    At most `limit`, the largest first; the pruning rule's own pick is always among them."""
    best_per_width = {}
    for i in self.order:  # most parameters first: the first of a width that fits is its deepest
      if not low * target <= self.params[i] <= target:
        continue
      a = self.archs[i]
      width = (a['hidden'],) + tuple(a['layers'][0][f] for f in ('heads', 'kv_groups', 'ffn'))
      best_per_width.setdefault(width, i)
    chosen = sorted(best_per_width.values(), key=lambda i: -self.params[i])[:limit]
    return [(self.archs[i], int(self.params[i])) for i in chosen] or [self.pick(target)]
