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
  near = rule.shapes_near(target, low, 1000)
  got = [a for a, _ in near]
  got_params = [int(space.cost(arch_lib.from_json(a, space.cfg))['params']) for a in got]
  assert [p for _, p in near] == got_params
  assert {_width(a): p for a, p in zip(got, got_params)} == expected
  assert len(got) == len(expected) and got_params == sorted(got_params, reverse=True)
  # The pruning rule's pick is the first; a limit keeps the largest.
  assert near[0] == rule.pick(target)
  assert rule.shapes_near(target, low, 3) == near[:3]
  # Nothing in range: the rule's pick alone.
  assert rule.shapes_near(target, 1.0, 5) in ([near[0]], [])


def test_report_hypervolumes_use_the_finetuned_models_reference():
  """The report's reference point comes from the models fine-tuned with the same tokens (1.1 x
  their worst perplexity), so a pruned-only model with a perplexity in the millions adds nothing
  instead of flattening every front's hypervolume; areas computed by hand as unions of boxes."""
  from elastic_jax.compress.job import hypervolumes  # noqa: PLC0415
  m = lambda ppl, params: {'ppl': ppl, 'params': params}
  budgets = {'0.3': {'search': m(40.0, 30), 'pruned': m(2e7, 30), 'pruned_finetuned': m(50.0, 30),
                     'budget_pruned': m(9e6, 29), 'budget_pruned_finetuned': m(90.0, 29)},
             '0.7': {'search': m(20.0, 70), 'pruned': m(80.0, 70), 'pruned_finetuned': m(18.0, 70),
                     'budget_pruned': m(5e3, 69), 'budget_pruned_finetuned': m(30.0, 69)}}
  out = hypervolumes(budgets, 100)
  r = 99.0  # 1.1 x 90, the worst fine-tuned perplexity
  np.testing.assert_allclose(out['hv_ref'], [r, 100.0])
  # Two points (p1, s1), (p2, s2) with p1 > p2 and s1 < s2: boxes up to (r, 100).
  two = lambda p1, s1, p2, s2: (r - p1) * (100 - s1) + (p1 - p2) * (100 - s2)
  np.testing.assert_allclose(out['hv_search'], two(40, 30, 20, 70))
  np.testing.assert_allclose(out['hv_pruning'], two(50, 30, 18, 70))
  np.testing.assert_allclose(out['hv_budget_pruning'], two(90, 29, 30, 69))
  np.testing.assert_allclose(out['hv_pruned_only'], (r - 80) * (100 - 70))
