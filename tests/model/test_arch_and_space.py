"""Architecture-as-data: JSON round trip, validation, genomes, sampling, no retracing, vmap."""

import itertools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lowerings, randomize
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax.config import BLOCK_TYPES, ModelConfig, space_config
from elastic_jax.errors import UserError
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

SPACE = dict(num_layers=4, hidden=[16, 24], depth=[2, 3, 4],
             blocks=['transformer', 'bottleneck', 'skip'], heads=[2, 4], kv_groups=[1, 2],
             head_dim=[4, 6], ffn=[12, 20], inner=[8], bottleneck_head_dim=4)


@pytest.fixture(scope='module')
def setup():
  cfg = ModelConfig(kind='decoder', vocab_size=37, max_len=16, positions='rotary',
                    norm='rmsnorm', mlp='swiglu')
  space = Space(cfg, space_config(SPACE), seq_len=7)
  model = randomize(Model(cfg, space.cfg.supernet_dims(), rngs=nnx.Rngs(0)), 1)
  batch = {'tokens': jax.random.randint(jax.random.key(0), (2, 7), 0, 37)}
  return cfg, space, model, batch


def test_json_round_trip_and_genome_round_trip(setup):
  _, space, _, _ = setup
  archs = space.sample(jax.random.key(1), 30)
  for a in arch_lib.unstack(archs):
    d = json.loads(arch_lib.dumps(a))
    b = arch_lib.from_json(d, space.cfg)
    chex.assert_trees_all_equal(a, b)
    genome = space.encode(a)
    chex.assert_trees_all_equal(space.decode(genome), a)
    assert np.all((0 <= genome) & (genome < space.gene_sizes))


def test_decoded_genomes_are_valid(setup):
  _, space, _, _ = setup
  archs = jax.vmap(space.decode)(space.random_genomes(jax.random.key(2), 500))
  assert np.all(np.asarray(archs.heads) % np.asarray(archs.kv_groups) == 0)
  for a in arch_lib.unstack(jax.tree.map(lambda x: x[:50], archs)):
    arch_lib.from_json(arch_lib.to_json(a), space.cfg)  # raises if outside the space


@pytest.mark.parametrize('mutate, message', [
    (lambda d: d.update(hidden=20), 'hidden=20'),
    (lambda d: d['layers'][1].update(ffn=13), 'layers[1].ffn=13'),
    (lambda d: d['layers'][0].update(block='conv'), "layers[0].block='conv'"),
    (lambda d: d['layers'][2].update(heads=2, kv_groups=4), 'layers[2].kv_groups=4'),
    (lambda d: d['layers'].pop(), 'must list 4 layers'),
    (lambda d: d.pop('depth'), 'missing field'),
])
def test_validation_names_field_value_and_allowed(setup, mutate, message):
  _, space, _, _ = setup
  d = arch_lib.to_json(space.largest())
  mutate(d)
  with pytest.raises(UserError, match=message.replace('[', r'\[').replace(']', r'\]')):
    arch_lib.from_json(d, space.cfg)


def test_sampling_extremes_and_budget(setup):
  _, space, _, _ = setup
  lo, hi = space.parameter_range()
  assert lo < hi
  params = jax.vmap(lambda a: space.cost(a)['params'])(space.sample(jax.random.key(3), 200))
  assert lo <= int(params.min()) and int(params.max()) <= hi
  budget = (lo + hi) // 2
  under = space.sample(jax.random.key(4), 40, max_params=budget)
  assert int(jax.vmap(lambda a: space.cost(a)['params'])(under).max()) <= budget
  with pytest.raises(UserError, match=f'{lo:,}'):
    space.sample(jax.random.key(5), 4, max_params=lo - 1)


def test_fifty_archs_trace_the_forward_once(setup):
  _, space, model, batch = setup
  graphdef, state = nnx.split(model)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(state, arch, batch):
    return nnx.merge(graphdef, state)(batch, arch)

  archs = arch_lib.unstack(space.sample(jax.random.key(6), 50))
  assert len({arch_lib.dumps(a) for a in archs}) == 50
  outs = [forward(state, a, batch) for a in archs]
  for a, out in list(zip(archs, outs))[:3]:
    np.testing.assert_allclose(out, model(batch, a), rtol=1e-5, atol=1e-5)


def test_vmap_over_16_archs_equals_16_calls(setup):
  _, space, model, batch = setup
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, a: nnx.merge(graphdef, s)(batch, a))
  archs = space.sample(jax.random.key(7), 16)
  together = jax.jit(jax.vmap(forward, in_axes=(None, 0)))(state, archs)
  for i, a in enumerate(arch_lib.unstack(archs)):
    np.testing.assert_allclose(together[i], forward(state, a), rtol=1e-5, atol=1e-5)


def test_host_calls_of_the_space_and_costs_are_one_program_each():
  """From host code, `random_genomes`, `decode`, `encode`, `cost` and `layer_on` run as one
  compiled program each, or none (op by op, every primitive was a program of its own: 47 for
  `elastic-jax sample --n=1`, 95 for `evaluate --workdir=W --arch=largest`), and give what the
  same functions give traced inside a jit. A space of its own shapes, so nothing is compiled
  yet in this process."""
  cfg = ModelConfig(kind='decoder', vocab_size=29, max_len=16, positions='rotary',
                    norm='rmsnorm', mlp='swiglu')
  space = Space(cfg, space_config({**SPACE, 'num_layers': 5, 'depth': [3, 5]}), seq_len=9)
  key = jax.random.key(13)
  with lowerings() as names:
    genomes = space.random_genomes(key, 3)
    arch = space.decode(np.asarray(genomes)[1])
    genome = space.encode(arch)
    cost = space.cost(arch)
    on = arch.layer_on()
  assert sorted(names) == ['jit(arch_cost)', 'jit(decode)', 'jit(encode)',
                           'jit(random_genomes)'], names
  # Another Space of the same configuration is equal to it and reuses its programs.
  again = Space(cfg, space_config({**SPACE, 'num_layers': 5, 'depth': [3, 5]}), seq_len=9)
  assert again == space and hash(again) == hash(space) and again != Space(cfg, space.cfg)
  with lowerings() as names:
    chex.assert_trees_all_equal(again.decode(np.asarray(again.random_genomes(key, 3))[1]), arch)
  assert names == [], names

  @jax.jit
  def traced(key, i):
    genomes = space.random_genomes(key, 3)
    arch = space.decode(genomes[i])
    return genomes, arch, space.encode(arch), space.cost(arch), arch.layer_on()

  chex.assert_trees_all_equal((genomes, arch, genome, cost, on), traced(key, 1),
                              strict=False)
  assert isinstance(on, np.ndarray) and on.sum() == int(arch.depth) - int(
      np.sum((np.asarray(arch.block) == BLOCK_TYPES.index('skip'))[:int(arch.depth)]))


def test_space_count_matches_enumeration():
  """The distinct-architecture count equals brute-force enumeration of a tiny space."""
  cfg = ModelConfig(vocab_size=11, max_len=8)
  sc = space_config(dict(num_layers=2, hidden=[8, 12], depth=[1, 2],
                         blocks=['transformer', 'skip'], heads=[2, 4], kv_groups=[1, 2],
                         head_dim=[2], ffn=[4, 8]))
  space = Space(cfg, sc)
  g = np.stack(np.meshgrid(*[np.arange(n) for n in space.gene_sizes], indexing='ij'), -1)
  archs = jax.vmap(space.decode)(jnp.asarray(g.reshape(-1, space.num_genes)))
  keys = set()
  for a in arch_lib.unstack(archs):
    d = arch_lib.to_json(a)
    d['layers'] = [l if l['block'] != 'skip' else 'skip'
                   for i, l in enumerate(d['layers']) if i < d['depth']]
    keys.add(json.dumps(d))
  assert space.num_architectures() == len(keys)


@pytest.mark.parametrize('cost', ['params', 'flops', 'kv_cache'])
def test_extreme_genomes_are_the_brute_force_extremes(cost):
  """`extreme_value` (greedy per layer) equals the min / max over every genome of a tiny space
  with three block types; `largest`, `smallest` (no 'skip') and `fewest_params` too."""
  from elastic_jax.search.genomes import COST_KEYS, extreme_value
  cfg = ModelConfig(vocab_size=11, max_len=8)
  sc = space_config(dict(num_layers=2, hidden=[8, 12], depth=[1, 2],
                         blocks=['transformer', 'bottleneck', 'skip'], heads=[2, 4],
                         kv_groups=[1, 2], head_dim=[2], ffn=[4, 8], inner=[4],
                         bottleneck_head_dim=2))
  space = Space(cfg, sc, seq_len=8)
  g = np.stack(np.meshgrid(*[np.arange(n) for n in space.gene_sizes], indexing='ij'), -1)
  g = g.reshape(-1, space.num_genes)
  costs = jax.vmap(lambda x: space.cost(space.decode(x)))(jnp.asarray(g))
  values = np.asarray(costs[COST_KEYS[cost]], np.float64)
  assert len(np.unique(values)) > 3  # the space's costs spread: extremes mean something
  assert extreme_value(space, cost, largest=False) == pytest.approx(values.min(), rel=1e-6)
  assert extreme_value(space, cost, largest=True) == pytest.approx(values.max(), rel=1e-6)
  if cost == 'params':
    archs = jax.vmap(space.decode)(jnp.asarray(g))
    no_skip = np.all(np.asarray(archs.block) != BLOCK_TYPES.index('skip'), axis=1)
    params = np.asarray(costs['params'])
    assert int(space.cost(space.largest())['params']) == params.max()
    assert int(space.cost(space.smallest())['params']) == params[no_skip].min()
    assert int(space.cost(space.fewest_params())['params']) == params.min()
    assert params[no_skip].min() > params.min()  # 'skip' makes a difference here
    assert space.parameter_range() == (params.min(), params.max())


def test_bad_space_configs():
  with pytest.raises(UserError, match='does not divide the largest hidden size'):
    space_config(dict(num_layers=2, hidden=[30], heads=[4], ffn=[8]))
  with pytest.raises(UserError, match='space.depth'):
    space_config(dict(num_layers=2, hidden=[32], heads=[4], ffn=[8], depth=[3]))
  with pytest.raises(UserError, match='space.kv_groups'):
    space_config(dict(num_layers=2, hidden=[32], heads=[4], kv_groups=[3], ffn=[8]))
  with pytest.raises(UserError, match='model.norm'):
    ModelConfig(norm='batchnorm')
  with pytest.raises(UserError, match=r'model.param_dtype=.float64.*JAX_ENABLE_X64=1'):
    ModelConfig(param_dtype='float64')  # 64-bit JAX is off in the tests
  with jax.enable_x64(True):
    assert ModelConfig(dtype='float64', param_dtype='float64').dtype == 'float64'


@pytest.mark.parametrize('heads, kv_groups, expected', [
    ([2, 4], [], 1),  # multi-head attention: a group per head
    ([6], [2], 3),  # one grouped-query shape
    ([2, 4], [1, 2], 0),  # 2 / 1, 2 / 2, 4 / 1, 4 / 2
    ([4, 8], [4], 0),  # 4 / 4, 8 / 4
    ([4, 6], [2], 0),
])
def test_kv_ratio_is_the_one_heads_per_group_ratio_of_every_architecture(heads, kv_groups,
                                                                           expected):
  """The supernet's static ratio (its attention then reads K / V without a gather) against the
  ratios of every genome the space can decode, enumerated."""
  cfg = ModelConfig(kind='decoder', vocab_size=37, max_len=16)
  sc = space_config(dict(num_layers=2, hidden=[16], depth=[1, 2], blocks=['transformer'],
                         heads=heads, kv_groups=kv_groups, head_dim=[4], ffn=[8]))
  space = Space(cfg, sc, seq_len=7)
  genomes = np.asarray(list(itertools.product(*[range(int(n)) for n in space.gene_sizes])),
                       np.int32)
  archs = jax.vmap(space.decode)(jnp.asarray(genomes))
  ratios = set((np.asarray(archs.heads) // np.asarray(archs.kv_groups)).ravel().tolist())
  assert sc.kv_ratio == (ratios.pop() if len(ratios) == 1 else 0) == expected
  assert {l.kv_ratio for l in sc.supernet_dims().layers} == {expected}
