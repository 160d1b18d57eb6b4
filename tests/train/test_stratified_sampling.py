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


def test_anchored_trains_the_anchors_and_neighbours_of_their_sizes(tiny_cfg):
  space = build_space(tiny_cfg)
  candidates = arch_lib.unstack(jax.vmap(space.decode)(space.random_genomes(jax.random.key(3),
                                                                            64)))
  sizes = _params(space, arch_lib.stack(candidates))
  order = np.argsort(sizes)
  # Two anchors whose sizes span the middle half of the candidates' range.
  low, high = candidates[order[16]], candidates[order[48]]
  lo, hi = sizes[order[16]], sizes[order[48]]
  assert lo < hi
  sampler = Sampler(space, 'anchored', num_random=3, anchors=[low, high])
  assert sampler.k == 5 and not teacher_is_first('anchored')
  assert sampler.labels == ('anchor0', 'anchor1', 'random0', 'random1', 'random2')
  draw = jax.jit(jax.vmap(lambda step: sampler(jax.random.key(0), step)))
  draws = draw(np.arange(50))
  for column, anchor in ((0, low), (1, high)):  # every step, in the given order
    for drawn, given in zip(jax.tree.leaves(draws), jax.tree.leaves(anchor)):
      assert (np.asarray(drawn)[:, column] == np.asarray(given)).all()
  randoms = jax.tree.map(lambda x: np.asarray(x)[:, 2:].reshape((-1,) + x.shape[2:]), draws)
  params = _params(space, randoms)
  # Every random member lies in the anchors' span (brute force over the decoded archs), and
  # they are not all the same few sizes.
  assert params.min() >= lo and params.max() <= hi, (lo, hi, params.min(), params.max())
  assert len(set(params.tolist())) > 20


def test_anchored_needs_anchors_and_a_fixed_space(tiny_cfg, tmp_path):
  import pytest

  from elastic_jax.errors import UserError
  from elastic_jax.train.trainer import train
  space = build_space(tiny_cfg)
  with pytest.raises(UserError, match='train.anchor_archs'):
    Sampler(space, 'anchored')
  with pytest.raises(UserError, match='cannot follow a space that changes'):
    Sampler(space, 'anchored', anchors=[space.smallest()]).allowed(None)
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.sampling = 'anchored'
  cfg.train.anchor_archs = str(tmp_path / 'missing.jsonl')
  with pytest.raises(UserError, match='missing.jsonl does not exist'):
    train(cfg, tmp_path / 'w', progress=False)
  assert not (tmp_path / 'w').exists()


def test_one_anchor_spans_sizes_just_below_it(tiny_cfg):
  from elastic_jax.train.sampling import ANCHOR_REACH
  space = build_space(tiny_cfg)
  anchor = space.largest()
  size = float(_params(space, arch_lib.stack([anchor]))[0])
  sampler = Sampler(space, 'anchored', num_random=2, anchors=[anchor])
  draws = jax.jit(jax.vmap(lambda step: sampler(jax.random.key(1), step)))(np.arange(30))
  params = _params(space, jax.tree.map(lambda x: np.asarray(x)[:, 1:].reshape((-1,) + x.shape[2:]),
                                       draws))
  assert params.min() >= ANCHOR_REACH * size and params.max() <= size
  assert len(set(params.tolist())) > 5
