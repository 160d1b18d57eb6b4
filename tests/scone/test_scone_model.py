"""The f-gram model inside the supernet, the precomputed table, and inference from it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import XLA_DEFAULTS
from flax import nnx

from elastic_jax.config import LayerDims, ModelConfig, ModelDims
from elastic_jax.errors import UserError
from elastic_jax.model.supernet import Model
from elastic_jax.scone import fgrams as fgrams_lib
from elastic_jax.scone import lookup
from elastic_jax.scone import table as table_lib
from elastic_jax.scone.config import SconeConfig

K = 4
CFG = ModelConfig(vocab_size=11, max_len=31, positions='learned', norm='rmsnorm', mlp='swiglu',
                  use_bias=False)
DIMS = ModelDims(hidden=13, head_dim=5, bottleneck_head_dim=0,
                 layers=(LayerDims(('transformer',), 3, 3, 17),) * 2)
SCONE = SconeConfig(max_n=K, min_count=3, num_fgrams=60, layers=2, width=10, heads=2, ffn=7)


def model(seed=0, scone=SCONE, trained=True):
  """`trained`: out_proj random (it starts at zero, where the f-gram model adds nothing and every
  comparison of its outputs would hold whatever its blocks computed)."""
  m = Model(CFG, DIMS, rngs=nnx.Rngs(seed), scone=scone)
  if scone is not None and trained:
    out = m.scone.out_proj
    out[...] = 0.3 * jax.random.normal(jax.random.key(seed + 7), out[...].shape)
  return m


def corpus_and_fgrams():
  rng = np.random.default_rng(0)
  phrase = [3, 1, 4, 1, 5]
  docs = [np.asarray(rng.integers(0, 6, 9).tolist() + phrase[:rng.integers(2, 6)], np.int32)
          for _ in range(30)]
  fg = fgrams_lib.extract(lambda: [docs], max_n=K, min_count=3, num_fgrams=60)
  return docs, fg


def batch(docs, fg):
  tokens = np.stack([np.concatenate([docs[i], docs[i + 1]])[:17] for i in range(0, 6, 2)])
  positions = np.broadcast_to(np.arange(17), tokens.shape).astype(np.int32)
  segs = np.ones_like(tokens)
  hits = lookup.FgramIndex(fg).hits(tokens, positions, segs)
  return {'tokens': jnp.asarray(tokens), 'positions': jnp.asarray(positions),
          'fgram_hits': jnp.asarray(hits)}


def reference_rows(m, fg, ids):
  """Each f-gram alone through the f-gram model: its n tokens, no padding slots."""
  rows = {}
  for i in ids:
    gram = np.asarray(fg.gram(int(i)))
    x = m.embed.token_vectors(jnp.asarray(gram))[None]
    rows[int(i)] = np.asarray(m.scone(x, jnp.asarray([len(gram)])))[0]
  return rows


def test_without_fgram_inputs_the_model_is_the_baseline():
  docs, fg = corpus_and_fgrams()
  b = batch(docs, fg)
  base, with_scone = model(scone=None), model()
  plain = {k: b[k] for k in ('tokens', 'positions')}
  assert np.array_equal(base(plain), with_scone(plain))
  none = {**plain, 'fgram_hits': jnp.full_like(b['fgram_hits'], -1)}
  assert np.array_equal(base(plain), with_scone(none))
  assert not np.allclose(base(plain), with_scone(b), atol=1e-4)  # the f-grams do change it
  # An untrained f-gram model adds nothing to the last token's embedding (out_proj starts at
  # zero): with f-grams matched, it is still the baseline.
  assert np.array_equal(base(plain), model(trained=False)(b))


@pytest.mark.parametrize('n_used', [None, 9])
def test_training_forward_equals_brute_force_substitution(n_used):
  docs, fg = corpus_and_fgrams()
  b = batch(docs, fg)
  m = model()
  if n_used is not None:
    b['fgram_limit'] = jnp.full((3,), n_used, jnp.int32)
  got = m(b)
  grams = {fg.gram(i): i for i in range(n_used or len(fg))}
  tokens = np.asarray(b['tokens'])
  ids = np.full(tokens.shape, -1)
  for r in range(tokens.shape[0]):
    for t in range(tokens.shape[1]):
      for n in range(2, K + 1):
        if t >= n - 1 and tuple(tokens[r, t - n + 1:t + 1].tolist()) in grams:
          ids[r, t] = grams[tuple(tokens[r, t - n + 1:t + 1].tolist())]
  assert (ids >= 0).sum() > 10
  rows = reference_rows(m, fg, np.unique(ids[ids >= 0]))
  emb = np.zeros(tokens.shape + (DIMS.hidden,), np.float32)
  for (r, t), i in np.ndenumerate(ids):
    if i >= 0:
      emb[r, t] = rows[i]
  want = m({'tokens': b['tokens'], 'positions': b['positions'], 'fgram_ids': jnp.asarray(ids),
            'fgram_emb': jnp.asarray(emb)})
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_table_equals_the_fgram_models_outputs():
  _, fg = corpus_and_fgrams()
  m = model()
  table = table_lib.precompute(m, fg, batch=7)  # several calls, the last one padded
  rows = reference_rows(m, fg, range(len(fg)))
  assert table.shape == (len(fg), DIMS.hidden) and table.dtype == np.float32
  # float32, 1e-6 relative (entries reach ~4, where an ulp is 4.8e-7; eager and jitted calls
  # may round differently by a few ulp)
  np.testing.assert_allclose(table, np.stack([rows[i] for i in range(len(fg))]), rtol=1e-6,
                             atol=1e-6)


def test_inference_from_the_table_equals_the_training_forward(tmp_path, monkeypatch):
  """Bit for bit, as compiled programs (both forwards jitted, as training and inference run;
  op-by-op eager execution or tiny matmul shapes may differ in the last bit, ~3e-8), the table's
  rows and both forwards compiled with XLA's own CPU settings: under the test run's cheaper ones
  (tests/conftest.py: loop emitters) the f-gram model's rows round ~3e-8 apart inside the
  training program and outside it."""
  monkeypatch.setattr(table_lib, '_rows', jax.jit(table_lib._rows.__wrapped__, static_argnums=0,
                                                  compiler_options=XLA_DEFAULTS))
  docs, fg = corpus_and_fgrams()
  b = batch(docs, fg)
  m = model()
  graphdef, state = nnx.split(m)
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch),
                    compiler_options=XLA_DEFAULTS)
  fp = table_lib.fingerprint(m, fg)
  table_lib.save(tmp_path / 't', table_lib.precompute(m, fg, batch=64), fg, fp)
  table = table_lib.load(tmp_path / 't', fp)
  assert isinstance(table.rows_SD, np.memmap)
  for n_used in (None, 9):
    train_batch = dict(b)
    if n_used is not None:
      train_batch['fgram_limit'] = jnp.full((3,), n_used, jnp.int32)
    plain = {k: np.asarray(b[k]) for k in ('tokens', 'positions')}
    infer = {k: jnp.asarray(v) for k, v in table(plain, n_used).items()}
    assert int((infer['fgram_ids'] >= 0).sum()) > 10
    np.testing.assert_array_equal(forward(state, infer), forward(state, train_batch))


def test_table_from_another_run_or_corrupt_is_one_clear_error(tmp_path):
  _, fg = corpus_and_fgrams()
  m, other = model(0), model(1)
  d = tmp_path / 't'
  table_lib.save(d, table_lib.precompute(m, fg, batch=64), fg, table_lib.fingerprint(m, fg))
  with pytest.raises(UserError, match='built from another run'):
    table_lib.load(d, table_lib.fingerprint(other, fg))
  fewer = fgrams_lib.Fgrams(fg.tokens_SK[:5], fg.lengths_S[:5], fg.counts_S[:5], 3)
  with pytest.raises(UserError, match='built from another run'):
    table_lib.load(d, table_lib.fingerprint(m, fewer))
  data = (d / 'table.npy').read_bytes()
  (d / 'table.npy').write_bytes(data[:len(data) // 2])
  with pytest.raises(UserError, match=r'table\.npy is corrupt') as e:
    table_lib.load(d, table_lib.fingerprint(m, fg))
  assert '\n' not in str(e.value)
  with pytest.raises(UserError, match='no SCONE table'):
    table_lib.load(tmp_path / 'absent')
