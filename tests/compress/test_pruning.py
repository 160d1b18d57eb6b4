"""The pruning rule's shapes near a budget (compress.anchors='loss' scores them), checked by brute
force over every uniform candidate."""

from __future__ import annotations

import jax
import numpy as np

from elastic_jax import arch as arch_lib
from elastic_jax.compress import pruning
from elastic_jax.workdir import build_space


def _width(a):
  return (a['hidden'],) + tuple(a['layers'][0][f] for f in ('heads', 'kv_groups', 'ffn'))


def test_shapes_near_are_the_deepest_fitting_model_of_each_width(tiny_cfg):
  space = build_space(tiny_cfg)
  order = list(range(space.cfg.num_layers))[::-1]
  rule = pruning.PruningRule(space, order)
  archs = pruning.candidates(space, order)
  params = np.asarray(jax.vmap(lambda a: space.cost(a)['params'])(
      arch_lib.stack([arch_lib.from_json(a, space.cfg) for a in archs])))
  target, low = float(np.median(params)), 0.6
  expected = {}
  for a, p in zip(archs, params):
    if low * target <= p <= target:
      expected[_width(a)] = max(expected.get(_width(a), 0), int(p))
  got = rule.shapes_near(target, low, 1000)
  got_params = [int(space.cost(arch_lib.from_json(a, space.cfg))['params']) for a in got]
  assert {_width(a): p for a, p in zip(got, got_params)} == expected
  assert len(got) == len(expected) and got_params == sorted(got_params, reverse=True)
  # The pruning rule's pick is the first; a limit keeps the largest.
  assert got[0] == rule.pick(target)[0]
  assert rule.shapes_near(target, low, 3) == got[:3]
  # Nothing in range: the rule's pick alone.
  assert rule.shapes_near(target, 1.0, 5) in ([got[0]], [])
