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


def _table(space: Space, layer_order: list[int]):
  """(candidate archs, their parameters, indices best first: most parameters, then more layers,
  then wider FFN)."""
  archs = candidates(space, layer_order)
  stacked = arch_lib.stack([arch_lib.from_json(a, space.cfg) for a in archs])
  params = np.asarray(jax.vmap(lambda a: space.cost(a)['params'])(stacked))
  layers = np.asarray([sum(l['block'] != 'skip' for l in a['layers'][:a['depth']])
                       for a in archs])
  ffn = np.asarray([a['layers'][0]['ffn'] for a in archs])
  return archs, params, np.lexsort((ffn, layers, params))[::-1]


def _pick(table, max_params: float) -> tuple[dict, int]:
  archs, params, order = table
  ok = params <= max_params
  if not ok.any():
    raise UserError(f'no pruned model has <= {max_params:,.0f} parameters: the smallest uniform '
                    f'one has {int(params.min()):,}; raise the budget')
  best = next(i for i in order if ok[i])
  return archs[best], int(params[best])


def prune_arch(space: Space, layer_order: list[int], max_params: float) -> tuple[dict, int]:
  """(JSON arch, parameters) of the pruned model at `max_params`."""
  return _pick(_table(space, layer_order), max_params)


def seed_archs(space: Space, layer_order: list[int], targets, limit: int) -> list[dict]:
  """The pruned models at `targets` (parameter counts, in order; those no uniform model meets
  are passed over), each shape once, at most `limit`: starting points for the search."""
  table = _table(space, layer_order)
  out = []
  for target in targets:
    try:
      arch_json = _pick(table, target)[0]
    except UserError:
      continue
    if arch_json not in out:
      out.append(arch_json)
    if len(out) == limit:
      break
  return out


def shapes_near(space: Space, layer_order: list[int], target: float, low: float,
                limit: int) -> list[dict]:
  """Uniform models with `low` * target to target parameters, one per width (hidden, heads, KV
  groups, FFN), each with as many of the most important layers as fit: the shapes among which
  measured loss, not size alone, picks (compress.anchors='loss'). At most `limit`, the largest
  first; the pruning rule's own pick is always among them."""
  archs, params, order = _table(space, layer_order)
  best_per_width = {}
  for i in order:  # most parameters first: the first of a width that fits is its deepest
    if not low * target <= params[i] <= target:
      continue
    a = archs[i]
    width = (a['hidden'],) + tuple(a['layers'][0][f] for f in ('heads', 'kv_groups', 'ffn'))
    best_per_width.setdefault(width, i)
  chosen = sorted(best_per_width.values(), key=lambda i: -params[i])[:limit]
  return [archs[i] for i in chosen] or [_pick((archs, params, order), target)[0]]
