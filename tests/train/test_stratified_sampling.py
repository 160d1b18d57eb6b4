"""whittle's parameter-stratified sampling as a training strategy: the random sub-networks of a
step spread evenly over the space's parameter range, unlike uniform genes."""

from __future__ import annotations

import jax
import numpy as np

from elastic_jax import arch as arch_lib
from elastic_jax.export import export, param_count
from elastic_jax.train.sampling import STRATIFIED_BINS, Sampler, num_archs, teacher_is_first
from elastic_jax.workdir import build_space, init_supernet


def _params(space, archs):
  return np.asarray(jax.vmap(lambda a: space.cost(a)['params'])(archs))


def test_stratified_draws_cover_parameter_bins_evenly(tiny_cfg):
  space = build_space(tiny_cfg)
  assert num_archs('stratified', 2) == 4 and teacher_is_first('stratified')
  stratified = Sampler(space, 'stratified', num_random=2)
  uniform = Sampler(space, 'sandwich', num_random=2)
  key = jax.random.key(0)
  first = stratified(key, 7)
  assert arch_lib.to_json(arch_lib.unstack(first)[0]) == arch_lib.to_json(space.largest())
  assert arch_lib.to_json(arch_lib.unstack(first)[1]) == arch_lib.to_json(space.smallest())
  again = stratified(key, 7)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first),
                                                  jax.tree.leaves(again)))
  # The analytic count is the exported model's real one.
  model = init_supernet(tiny_cfg, space)
  a = arch_lib.unstack(first)[2]
  assert _params(space, arch_lib.stack([a]))[0] == param_count(export(model, space.cfg, a))
  lo, hi = space.parameter_range()
  edges = np.linspace(lo, hi, STRATIFIED_BINS + 1)

  def histogram(sampler):
    def random_params(step):  # the random members of a step (after largest and smallest)
      archs = jax.tree.map(lambda x: x[2:], sampler(key, step))
      return jax.vmap(lambda a: space.cost(a)['params'])(archs)
    draw = jax.jit(jax.vmap(random_params))
    draws = np.asarray(draw(np.arange(200))).ravel()
    return np.histogram(draws, edges)[0] / len(draws)
  h_strat, h_unif = histogram(stratified), histogram(uniform)
  # Uniform genes pile up where most gene combinations land; stratified draws are flatter.
  assert np.std(h_strat) < 0.5 * np.std(h_unif), (h_strat, h_unif)
  assert np.min(h_strat) > 0.05, h_strat
