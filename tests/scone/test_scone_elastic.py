"""SCONE's elastic dimensions: the f-gram count and the f-gram model's size as arch fields."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax.config import ModelConfig, space_config
from elastic_jax.errors import UserError
from elastic_jax.model.supernet import Model
from elastic_jax.scone import fgrams as fgrams_lib
from elastic_jax.scone import lookup
from elastic_jax.scone import table as table_lib
from elastic_jax.scone.config import SconeConfig, with_scone_choices
from elastic_jax.scone.model import FgramModel
from elastic_jax.space import Space

K = 4
CFG = ModelConfig(vocab_size=11, max_len=31, positions='learned', norm='rmsnorm', mlp='swiglu',
                  use_bias=False)
SCONE = SconeConfig(max_n=K, min_count=3, num_fgrams=60, layers=3, width=10, heads=2, ffn=9)
SPACE = {'num_layers': 2, 'hidden': (7, 13), 'heads': (3,), 'head_dim': (5,), 'ffn': (11, 17),
         'fgrams': (5, 17, 60), 'fgram_layers': (1, 3), 'fgram_ffn': (4, 9)}


def space():
  return Space(CFG, with_scone_choices(space_config(SPACE), SCONE), seq_len=17)


def model(seed=0):
  dims = space().cfg.supernet_dims()
  return randomize(Model(CFG, dims, rngs=nnx.Rngs(seed), scone=SCONE), seed + 1)


def corpus_and_fgrams():
  rng = np.random.default_rng(0)
  phrase = [3, 1, 4, 1, 5]
  docs = [np.asarray(rng.integers(0, 6, 9).tolist() + phrase[:rng.integers(2, 6)], np.int32)
          for _ in range(30)]
  return docs, fgrams_lib.extract(lambda: [docs], max_n=K, min_count=3, num_fgrams=60)


def tokens_and_positions(docs):
  tokens = np.stack([np.concatenate([docs[i], docs[i + 1]])[:17] for i in range(0, 6, 2)])
  return tokens, np.broadcast_to(np.arange(17), tokens.shape).astype(np.int32)


def arch(s, **fields):
  d = arch_lib.to_json(s.largest())
  d.update(fields)
  return arch_lib.from_json(d, s.cfg)


def test_fgram_count_equals_the_table_truncated_to_the_first_c_fgrams():
  """The training forward of a sub-network using c f-grams (the f-gram model on the device)
  equals, bit for bit in float32, the forward reading a table holding only the first c rows
  (compiled programs, the table computed 64 rows per call: on XLA CPU a matmul of another row
  count may round the last bit differently, ~5e-7)."""
  docs, fg = corpus_and_fgrams()
  s, m = space(), model()
  tokens, positions = tokens_and_positions(docs)
  hits = lookup.FgramIndex(fg).hits(tokens, positions)
  graphdef, state = nnx.split(m)
  forward = jax.jit(lambda state, batch, a: nnx.merge(graphdef, state)(batch, a))
  outputs = {}
  for c in (5, 17, 60):
    a = arch(s, hidden=7, fgrams=c, fgram_layers=1, fgram_ffn=4)
    train = forward(state, {'tokens': tokens, 'positions': positions, 'fgram_hits': hits}, a)
    full = table_lib.Table(table_lib.precompute(m, fg, arch=a, batch=64), fg,
                           lookup.FgramIndex(fg), {}, n_used=c)
    small = full.truncated(hidden=7)
    assert small.rows_SD.shape == (min(c, len(fg)), 7) and len(small.fgrams) == min(c, len(fg))
    plain = {'tokens': tokens, 'positions': positions}
    infer = small(plain)
    # The truncated table matches what the full one selects with n_used = c.
    np.testing.assert_array_equal(infer['fgram_ids'], full(plain)['fgram_ids'])
    infer['fgram_emb'] = np.pad(infer['fgram_emb'], ((0, 0), (0, 0), (0, 13 - 7)))
    np.testing.assert_array_equal(forward(state, infer, a), train)
    outputs[c] = np.asarray(train)
  assert (infer['fgram_ids'] >= 17).any()  # the largest count uses rows the others do not
  assert not np.allclose(outputs[5], outputs[17]) and not np.allclose(outputs[17], outputs[60])


@pytest.mark.parametrize('layers,ffn', [(1, 4), (2, 9), (3, 5)])
def test_masked_fgram_model_equals_a_dense_smaller_one(layers, ffn):
  full_cfg = SCONE
  full = randomize(FgramModel(CFG, 13, full_cfg, rngs=nnx.Rngs(0)), 3)
  dense = FgramModel(CFG, 13, dataclasses.replace(full_cfg, layers=layers, ffn=ffn),
                     rngs=nnx.Rngs(1))
  source = dict(nnx.to_flat_state(nnx.state(full, nnx.Param)))
  flat = nnx.to_flat_state(nnx.state(dense, nnx.Param))
  for path, var in flat:
    var.set_value(source[path][...][tuple(slice(0, n) for n in var.shape)])
  nnx.update(dense, nnx.from_flat_state(flat))
  x = jax.random.normal(jax.random.key(2), (19, K, 13))
  lengths = jnp.asarray(np.random.default_rng(0).integers(2, K + 1, 19), jnp.int32)
  want = dense(x, lengths)
  got = jax.jit(lambda l, f: full(x, lengths, l, f))(jnp.int32(layers), jnp.int32(ffn))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(full(x, lengths), want, atol=1e-3)  # the smaller model is another one


def test_scone_genes_decode_encode_count_and_cost():
  s = space()
  assert s.num_genes == 3 + 2 * 5 + 3  # the three SCONE genes trail the layer genes
  plain = Space(CFG, space_config({k: v for k, v in SPACE.items() if 'fgram' not in k}), 17)
  assert plain.num_genes == 13 and s.num_architectures() == 12 * plain.num_architectures()
  archs = s.sample(jax.random.key(0), 64)
  genomes = jax.vmap(s.encode)(archs)
  np.testing.assert_array_equal(jax.vmap(s.decode)(genomes).fgrams, archs.fgrams)
  seen = {(int(a.fgrams), int(a.fgram_layers), int(a.fgram_ffn)) for a in arch_lib.unstack(archs)}
  assert {f for f, _, _ in seen} == {5, 17, 60} and len(seen) == 12
  # Host table MB is f-grams x hidden x 4 bytes; parameters and FLOPs ignore SCONE's genes.
  cost = jax.vmap(s.cost)(archs)
  np.testing.assert_allclose(cost['table_mb'], 4e-6 * archs.fgrams * archs.hidden, rtol=1e-6)
  a, b = arch(s, fgrams=5, fgram_layers=1, fgram_ffn=4), arch(s, fgrams=60)
  ca, cb = s.cost(a), s.cost(b)
  assert float(cb['table_mb']) == pytest.approx(60 * 13 * 4 / 1e6)
  for key in ('params', 'flops_per_token', 'train_flops_per_token', 'param_bytes'):
    assert float(ca[key]) == float(cb[key])
  assert s.largest().fgrams == 60 and s.smallest().fgrams == 5
  d = arch_lib.to_json(a)
  assert arch_lib.to_json(arch_lib.from_json(d, s.cfg)) == d and d['fgram_ffn'] == 4
  assert 'fgrams' not in arch_lib.to_json(plain.largest())


def test_bad_scone_dimensions_are_one_clear_line():
  s = space()
  d = arch_lib.to_json(s.largest())
  with pytest.raises(UserError, match=r'fgrams=7 is outside the search space.*\[5, 17, 60\]'):
    arch_lib.from_json({**d, 'fgrams': 7}, s.cfg)
  with pytest.raises(UserError, match=r"\['fgrams', 'fgram_layers', 'fgram_ffn'\] missing"):
    arch_lib.from_json({k: v for k, v in d.items() if 'fgram' not in k}, s.cfg)
  plain = space_config({k: v for k, v in SPACE.items() if 'fgram' not in k})
  with pytest.raises(UserError, match='belong to a SCONE space'):
    arch_lib.from_json(d, plain)
  with pytest.raises(UserError, match=r'space.fgram_layers=\[1, 4\] .* <= scone.layers=3'):
    with_scone_choices(space_config({**SPACE, 'fgram_layers': (1, 4)}), SCONE)
  with pytest.raises(UserError, match='space.fgrams are SCONE dimensions: set scone.enabled'):
    with_scone_choices(space_config({'num_layers': 1, 'hidden': (8,), 'heads': (2,),
                                     'ffn': (8,), 'fgrams': (3,)}), None)
  # A SCONE run whose space lists none searches the scone section's maxima alone.
  only = with_scone_choices(plain, SCONE)
  assert (only.fgrams, only.fgram_layers, only.fgram_ffn) == ((60,), (3,), (9,))


@pytest.mark.parametrize('layers,ffn', [(1, 4), (3, 9)])
def test_fgram_model_size_costs_training_flops_and_parameters_only(layers, ffn):
  """The smaller f-gram model's parameters are the dense smaller model's real ones; its FLOPs
  are XLA's count of the compiled forward less its elementwise work (XLA counts every op)."""
  from elastic_jax import cost
  small = dataclasses.replace(SCONE, layers=layers, ffn=ffn)
  c = cost.scone_cost(CFG, 13, SCONE, 10, layers=layers, ffn=ffn)
  m = FgramModel(CFG, 13, small, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(m)
  assert c['fgram_model_params'] == sum(x.size for x in jax.tree.leaves(
      nnx.state(m, nnx.Param)))
  n = 64
  forward = jax.jit(lambda state, x, lengths: nnx.merge(graphdef, state)(x, lengths))
  xla = forward.lower(state, jnp.zeros((n, K, 13)), jnp.full((n,), K, jnp.int32)).compile()
  analysis = xla.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  ratio = c['fgram_train_flops_per_token'] / 3 / (analysis['flops'] / n)
  assert 0.75 < ratio <= 1.0, ratio
  assert c['table_bytes'] == cost.scone_cost(CFG, 13, SCONE, 10)['table_bytes']
