"""The population forward narrowed per hidden choice (`search.hidden_buckets`, `export.narrow`).

Each arch runs on the supernet cut to the smallest bucket width that holds its hidden size. The
losses must equal the full-width masked forward's and each arch's exported dense model's (its own
`evaluation.evaluate`), on random archs of a decoder space and of the FlexiBERT space (six block
types, head size = hidden / heads), with buckets at the choices and between them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, randomize

from elastic_jax import arch as arch_lib
from elastic_jax import evaluation, export
from elastic_jax.search import config as search_cfg
from elastic_jax.search.fitness import Fitness
from elastic_jax.workdir import build_space, init_supernet


def _setup(config: str, arg: str, n_archs: int):
  cfg = load_config(config, arg)
  space = build_space(cfg)
  model = randomize(init_supernet(cfg, space), seed=3, scale=0.1)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):
    tokens = rng.integers(0, cfg.model.vocab_size, (4, 13)).astype(np.int32)
    targets = rng.integers(0, cfg.model.vocab_size, (4, 13)).astype(np.int32)
    weights = (rng.random((4, 13)) < 0.8).astype(np.float32)
    batches.append({'tokens': tokens, 'targets': targets, 'weights': weights})
  genomes = np.asarray(space.random_genomes(jax.random.key(7), n_archs), np.int32)
  archs = jax.vmap(space.decode)(jnp.asarray(genomes))
  return space, model, batches, genomes, archs


@pytest.mark.parametrize('config, arg', [('quickstart', 'tiny'), ('flexibert', 'runlocal')])
def test_narrowed_population_equals_full_width_and_dense_exports(config, arg):
  space, model, batches, _, archs = _setup(config, arg, 16)
  choices = sorted(set(space.cfg.hidden))
  assert len(choices) >= 2 and len(set(np.asarray(archs.hidden).tolist())) >= 2
  full = evaluation.evaluate_population(model, batches, archs, hidden_buckets=())['loss']
  at_choices = evaluation.evaluate_population(model, batches, archs, chunk=1,
                                              hidden_buckets=choices)['loss']
  # A bucket between the two smallest choices: the smallest archs run there, still masked.
  between = evaluation.evaluate_population(model, batches, archs, chunk=1,
                                           hidden_buckets=((choices[0] + choices[1]) // 2,))
  auto = evaluation.evaluate_population(model, batches, archs)['loss']  # default: chunk 1, 'auto'
  np.testing.assert_allclose(at_choices, full, rtol=1e-5)
  np.testing.assert_allclose(auto, full, rtol=1e-5)
  np.testing.assert_allclose(between['loss'], full, rtol=1e-5)
  for i, arch in enumerate(arch_lib.unstack(archs)[:6]):
    dense = evaluation.evaluate(export.export(model, space.cfg, arch), batches)['loss']
    np.testing.assert_allclose(at_choices[i], dense, rtol=1e-5)


def test_narrow_keeps_everything_but_the_hidden_width():
  space, model, batches, _, archs = _setup('flexibert', 'runlocal', 4)
  narrow = export.narrow(model, min(space.cfg.hidden))
  assert narrow.dims.hidden == min(space.cfg.hidden)
  assert narrow.dims.layers == model.dims.layers  # every block type of every layer kept
  small = jax.tree.map(lambda x: x[np.argmin(np.asarray(archs.hidden))], archs)
  tokens = {'tokens': jnp.asarray(batches[0]['tokens'])}
  np.testing.assert_allclose(narrow(tokens, small), model(tokens, small), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='cannot narrow'):
    export.narrow(model, model.dims.hidden + 1)


def test_search_fitness_narrows_only_when_archs_run_one_at_a_time():
  space, model, batches, genomes, _ = _setup('quickstart', 'tiny', 9)
  assert search_cfg.search_config({}).hidden_buckets is True
  assert load_config('gpt2_medium_supernet', 'runlocal').search.hidden_buckets is False
  values = {}
  for buckets, chunk in ((True, 1), (False, 1), (True, 3)):
    fit = Fitness(space, ('loss',), model=model, batches=batches, chunk=chunk,
                  hidden_buckets=buckets)
    expected = tuple(sorted(set(space.cfg.hidden))) if buckets and chunk == 1 else ()
    assert fit.fn.hidden_buckets == expected
    values[buckets, chunk] = np.asarray(jax.jit(fit.fn)(jnp.asarray(genomes), fit.data))
  np.testing.assert_allclose(values[True, 1], values[False, 1], rtol=1e-5)
  np.testing.assert_allclose(values[True, 3], values[False, 1], rtol=1e-5)
