"""Sampling strategies: fixed K per step, deterministic in (seed, step), no retracing."""

import chex
import jax
import numpy as np
import pytest

from elastic_jax import arch as arch_lib
from elastic_jax.errors import UserError
from elastic_jax.train.sampling import Sampler
from elastic_jax.workdir import build_space


@pytest.fixture(scope='module')
def space():
  from conftest import load_config
  return build_space(load_config('quickstart', 'tiny'))


@pytest.mark.parametrize('strategy, k', [('standard', 1), ('random', 1), ('sandwich', 5),
                                         ('random_linear', 1)])
def test_strategies_are_deterministic_and_trace_once(space, strategy, k):
  chex.clear_trace_counter()  # counters are per code location, shared by parametrized cases
  sampler = Sampler(space, strategy, num_random=3, ramp_steps=10)
  key = jax.random.key(0)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def draw(step):
    return sampler(key, step)

  draws = [draw(step) for step in range(20)]
  assert all(d.hidden.shape == (k,) for d in draws)
  chex.assert_trees_all_equal(draws[7], draw(7), sampler(key, 7))
  if strategy in ('standard', 'sandwich'):
    largest = arch_lib.to_json(space.largest())
    assert all(arch_lib.to_json(arch_lib.unstack(d)[0]) == largest for d in draws)
  if strategy == 'sandwich':
    smallest = arch_lib.to_json(space.smallest())
    assert all(arch_lib.to_json(arch_lib.unstack(d)[1]) == smallest for d in draws)
    randoms = {arch_lib.dumps(a) for d in draws for a in arch_lib.unstack(d)[2:]}
    assert len(randoms) > 10


def test_random_linear_ramps_from_largest_to_random(space):
  sampler = Sampler(space, 'random_linear', ramp_steps=100)
  largest = arch_lib.dumps(space.largest())
  is_largest = lambda step: arch_lib.dumps(arch_lib.unstack(
      sampler(jax.random.key(step), step))[0]) == largest
  early = np.mean([is_largest(s) for s in range(0, 10)])
  late = np.mean([is_largest(s) for s in range(200, 230)])
  assert early > 0.8 and late < 0.5


def test_fixed_needs_an_arch(space):
  with pytest.raises(UserError, match='train.arch'):
    Sampler(space, 'fixed')
