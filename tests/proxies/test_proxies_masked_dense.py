"""Masked dimensions never change a score: every proxy of a sub-network of the supernet equals the
same proxy of its exported dense model; W-PCA's parameter count is the analytic one; scores are
deterministic for a seed and blind to padding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import export, proxies
from elastic_jax.config import ModelConfig, check_compatible, space_config
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

FAMILIES = {
    'gpt2_bottleneck': dict(kind='decoder', positions='learned', norm='layernorm', mlp='gelu'),
    'llama_gqa': dict(kind='decoder', positions='rotary', norm='rmsnorm', mlp='swiglu',
                      use_bias=False),
    # An encoder (BERT: post-norm, ReLU, MLM head, token types).
    'bert_post': dict(kind='encoder', positions='learned', norm='layernorm', mlp='relu',
                      norm_placement='post', head_transform=True, output_bias=True,
                      type_vocab_size=2),
}
# Two layers: enough for every block type, layer subsets and depth, and compiles in seconds.
SPACE = dict(num_layers=2, hidden=[18, 26, 34], depth=[1, 2],
             blocks=['transformer', 'bottleneck', 'skip'], heads=[2, 3, 6], kv_groups=[1, 2, 3],
             head_dim=[4, 6], ffn=[10, 22, 34], inner=[8, 14], bottleneck_head_dim=4)
VOCAB = 53
FORWARD = ('wpca', 'vpca', 'params', 'head_confidence', 'softmax_confidence',
           'activation_distance')


def init_model(cfg: ModelConfig, dims, seed: int) -> Model:
  """A model whose every parameter is random (biases and norms too, as `conftest.randomize`
  makes them), drawn with NumPy: JAX's eager init compiles a sampler per parameter shape, which
  costs seconds on a busy 2-core machine."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Model(cfg, dims, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    value = 0.3 * rng.normal(size=var.shape) + (1.0 if path[-1] == 'scale' else 0.0)
    var.set_value(jnp.asarray(value, var.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.cache
def space_of(family: str, **overrides):
  cfg = ModelConfig(vocab_size=VOCAB, max_len=16, **FAMILIES[family])
  space_cfg = space_config(dict(SPACE, **overrides))
  check_compatible(cfg, space_cfg)
  return cfg, Space(cfg, space_cfg, seq_len=11)


def build(family: str, seed: int = 0, **overrides):
  cfg, space = space_of(family, **overrides)
  return cfg, space, init_model(cfg, space.cfg.supernet_dims(), seed)


def batches(cfg: ModelConfig, n: int = 3, b: int = 5, t: int = 11, seed: int = 0) -> list[dict]:
  """Random token batches with two packed documents in row 0 and padding at the end of row 1."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    seg = np.ones((b, t), np.int32)
    seg[0, 6:] = 2
    seg[1, t - 3:] = 0
    pos = np.tile(np.arange(t), (b, 1))
    pos[0, 6:] = np.arange(t - 6)
    batch = {'tokens': rng.integers(0, VOCAB, (b, t)).astype(np.int32), 'segment_ids': seg,
             'positions': pos.astype(np.int32)}
    batch['targets'] = rng.integers(0, VOCAB, (b, t)).astype(np.int32)
    batch['weights'] = (seg != 0).astype(np.float32)
    if cfg.type_vocab_size:
      batch['token_types'] = rng.integers(0, cfg.type_vocab_size, (b, t)).astype(np.int32)
    out.append(batch)
  return out


def chosen_archs(space: Space):
  """Four archs (random sizes) covering both block types, a skipped layer, a shallow depth, and
  no layer at all. Blocks: 0 transformer, 1 bottleneck, 2 skip."""
  a = arch_lib.unstack(space.sample(jax.random.key(7), 3))
  a[0] = a[0].replace(block=jnp.asarray([0, 1], jnp.int32), depth=jnp.int32(2))
  a[1] = a[1].replace(block=jnp.asarray([2, 0], jnp.int32), depth=jnp.int32(2))
  a[2] = a[2].replace(block=jnp.asarray([1, 0], jnp.int32), depth=jnp.int32(1))
  nothing = a[0].replace(block=jnp.full((2,), 2, jnp.int32))
  return arch_lib.stack(a + [nothing])


def assert_scores_close(masked: dict, dense: dict, i: int, rtol: float, label):
  for name, value in dense.items():
    m = masked[name][i]
    if name in ('wpca', 'vpca', 'params'):
      assert m == value, (label, name, m, value)  # exact: integer counts, exact parameter count
    else:
      np.testing.assert_allclose(m, value, rtol=rtol, atol=1e-6, err_msg=f'{label} {name}')


@pytest.mark.parametrize('family', ['gpt2_bottleneck', 'llama_gqa'])
def test_forward_proxies_masked_equal_dense(family):
  cfg, space, model = build(family)
  data = batches(cfg)
  archs = chosen_archs(space)
  if family != 'gpt2_bottleneck':  # both block types; one dense compilation
    archs = jax.tree.map(lambda x: x[:1], archs)
  masked = proxies.score_archs(model, space, archs, data, names=FORWARD)
  for i, arch in enumerate(arch_lib.unstack(archs)):
    dense = export.export(model, space.cfg, arch)
    scores = proxies.score_dense(dense, data, names=FORWARD)
    assert_scores_close(masked, scores, i, 1e-5, (family, arch_lib.to_json(arch)))
    assert masked['params'][i] == int(space.cost(arch)['params']) == export.param_count(dense)
  np.testing.assert_allclose(masked['wpca'], masked['params'] * masked['vpca'])
  if family != 'gpt2_bottleneck':
    return
  # No layer: no FFN, so V-PCA and W-PCA are 0; the parameter count is the embedding's.
  assert masked['vpca'][-1] == 0 and masked['wpca'][-1] == 0 and masked['params'][-1] > 0
  assert np.all(masked['vpca'][:-1] > 0)
  # Padding tokens (segment 0) are excluded: changing them changes no score.
  repadded = [dict(b, tokens=np.where(b['segment_ids'] == 0, (b['tokens'] + 7) % VOCAB,
                                      b['tokens'])) for b in data]
  moved = proxies.score_archs(model, space, archs, repadded, names=FORWARD)
  for name in FORWARD:
    np.testing.assert_array_equal(masked[name], moved[name])
  # The population scorer (for search) agrees with score_archs.
  scorer = proxies.population_scorer(model, space, data, names=FORWARD)
  np.testing.assert_allclose(np.asarray(scorer(archs)['wpca']), masked['wpca'], rtol=1e-6)
  # bottleneck_ffn='exclude': a lone bottleneck layer's FFN no longer counts.
  lone = export.export(model, space.cfg, arch_lib.unstack(archs)[2])  # depth 1, a bottleneck
  assert lone.dims.layers[0].blocks == ('bottleneck',)
  excluded = proxies.score_dense(lone, data, {'bottleneck_ffn': 'exclude'}, names=('vpca',))
  assert excluded['vpca'] == 0 and masked['vpca'][2] > 0
  # JSON records for the CLI: one per arch, infinities as None.
  records = proxies.as_records(archs, masked)
  assert len(records) == 4 and records[0]['arch'] == arch_lib.to_json(arch_lib.unstack(archs)[0])
  assert records[3]['scores']['wpca'] == 0.0 and set(records[0]['scores']) == set(FORWARD)


@pytest.mark.parametrize('family', ['bert_post', 'llama_gqa'])
def test_forward_proxies_equal_their_definitions(family):
  """Head confidence, softmax confidence and activation distance of a dense model equal their
  definitions computed in NumPy from the model's own attention probabilities, logits and FFN
  pre-activations, both on their own forward pass and when they read the sliced forward pass
  of the gradient proxies (5 slices of one sequence: sums added up, unit codes concatenated)."""
  cfg, space, model = build(family, seed=4)
  dense_model = export.export(model, space.cfg, arch_lib.unstack(chosen_archs(space))[0])
  data = batches(cfg, n=1, seed=5)
  names = ('head_confidence', 'softmax_confidence', 'activation_distance')
  inputs = {k: jnp.asarray(v) for k, v in data[0].items() if k not in ('targets', 'weights')}
  logits, feats = dense_model(inputs, capture=('attn_probs', 'ffn_pre'))
  valid = data[0]['segment_ids'] != 0  # proxy.padding = 'exclude'
  p = np.exp(np.asarray(logits, np.float64) - np.max(np.asarray(logits, np.float64), -1,
                                                      keepdims=True))
  p /= p.sum(-1, keepdims=True)
  softmax_confidence = p.max(-1)[valid].mean()
  heads = np.concatenate([np.asarray(a).max(-1).transpose(0, 2, 1)[valid]  # [valid tokens, N]
                          for a in feats['attn_probs']], axis=1)
  codes = [np.asarray(h) > 0 for h in feats['ffn_pre']]  # [B, T, F] per layer
  b = valid.shape[0]
  agree = np.array([[sum(np.sum((c[i] == c[j]) & (valid[i] & valid[j])[:, None]) for c in codes)
                     for j in range(b)] for i in range(b)], np.float64)
  expected = {'head_confidence': heads.mean(), 'softmax_confidence': softmax_confidence,
              'activation_distance': np.linalg.slogdet(agree)[1]}
  own = proxies.score_dense(dense_model, data, {'num_batches': 1}, names=names)
  sliced = proxies.score_dense(dense_model, data, {'num_batches': 1, 'backward_batch': 1},
                               names=(*names, 'snip'))
  for name, value in expected.items():
    np.testing.assert_allclose(own[name], value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(sliced[name], value, rtol=1e-5, err_msg=f'{name} (sliced)')


def test_gradient_proxies_masked_equal_dense():
  """SNIP, grad-norm, synaptic saliency / diversity, SynFlow and jacobian covariance: gradients of
  the masked supernet w.r.t. the supernet's weights are exactly the sub-network's. Every proxy at
  once, so the forward-only proxies read the backward passes' forward pass: they equal their own
  forward pass's. An encoder with given MLM-style targets; two FFN widths and no 'skip' keep
  compilation short."""
  cfg, space, model = build('bert_post', seed=3, ffn=(10, 22), blocks=('transformer', 'bottleneck'))
  data = batches(cfg, seed=1)
  arch = arch_lib.unstack(chosen_archs(space))[0].replace(  # bottleneck, transformer
      block=jnp.asarray([1, 0], jnp.int32), ffn=jnp.asarray([22, 10], jnp.int32))
  names = proxies.PROXIES
  # The masked scores differentiate each minibatch of 5 sequences one sequence at a time (5
  # backward passes, gradients summed, features concatenated); the dense model's in one pass.
  assert proxies.gradients.sequence_passes(5, 2) == 5
  masked = proxies.score_archs(model, space, arch, data, {'backward_batch': 2}, names=names)
  dense_model = export.export(model, space.cfg, arch)
  dense = proxies.score_dense(dense_model, data, {'backward_batch': 0}, names=names)
  assert_scores_close(masked, dense, 0, 1e-4, 'every proxy')
  for name in proxies.GRADIENT_PROXIES:
    assert np.isfinite(masked[name][0]) and masked[name][0] != 0.0, name
  own_forward = proxies.score_dense(dense_model, data, names=FORWARD)
  for name in FORWARD:
    np.testing.assert_allclose(dense[name], own_forward[name], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_synflow_of_one_token_equals_synflow_of_every_token(family, monkeypatch):
  """SynFlow of a model whose blocks mix tokens only by attention runs on one token, times the
  valid tokens: equal to the definition, R summed over every valid token of a minibatch with
  packed documents and padding (bidirectional, causal, rotary with grouped queries; transformer,
  bottleneck and skipped layers, a shallow depth)."""
  from elastic_jax.model.blocks import equal_tokens_stay_equal
  from elastic_jax.model.layers import Attention, Norm
  from elastic_jax.proxies import gradients

  cfg, space, model = build(family, seed=2)
  assert equal_tokens_stay_equal(model)
  batch = jax.tree.map(jnp.asarray, batches(cfg, n=1)[0])
  inputs = {k: batch[k] for k in ('tokens', 'positions', 'segment_ids', 'token_types')
            if k in batch}
  valid = batch['weights']
  graphdef, state = nnx.split(model)
  archs = jax.tree.map(lambda x: x[:3], chosen_archs(space))

  def score(archs):  # a new function each call: jit must trace it again
    return jax.jit(lambda archs: jax.lax.map(
        lambda a: gradients.synflow(graphdef, state, a, inputs, valid, passes=5), archs))(archs)

  one_token = score(archs)
  monkeypatch.setattr(gradients, 'equal_tokens_stay_equal', lambda model: False)
  every_token = score(archs)
  assert np.all(np.asarray(one_token) > 0)
  np.testing.assert_allclose(one_token, every_token, rtol=1e-5)
  # The definition by reverse mode: R of the linearised network on every token, its gradient
  # w.r.t. every |theta|, sum over kernels of |W| * dR/d|W| (SynFlow computes a JVP instead).
  abs_state = jax.tree.map(jnp.abs, state)

  def linearised_output_sum(s, arch):
    model = nnx.merge(graphdef, s)
    for _, module in nnx.iter_modules(model):
      if isinstance(module, Norm):
        module.kind = 'nonorm'
      elif isinstance(module, Attention):
        module.q[...], module.k[...] = jnp.zeros_like(module.q[...]), jnp.zeros_like(module.k[...])
        for bias in (module.q_bias, module.k_bias):
          if bias is not None:
            bias[...] = jnp.zeros_like(bias[...])
    model = gradients._with_embedding(model, lambda x, mask: jnp.ones_like(x) * mask)
    return jnp.sum(model(inputs, arch) * valid[..., None])

  for i, arch in enumerate(arch_lib.unstack(archs)):
    grads = jax.jit(jax.grad(linearised_output_sum))(abs_state, arch)
    definition = sum(
        np.sum(np.asarray(w[...], np.float64) * np.asarray(g[...], np.float64))
        for (path, w), (_, g) in zip(nnx.to_flat_state(abs_state), nnx.to_flat_state(grads))
        if gradients.kernel_kind(path, w[...].ndim) is not None)
    np.testing.assert_allclose(one_token[i], definition, rtol=1e-5)


@pytest.mark.parametrize('batch_size, per_pass, passes', [
    (32, 8, 4), (32, 0, 1), (32, 64, 1), (5, 2, 5), (12, 5, 3), (12, 1, 12), (7, 7, 1)])
def test_sequence_passes_take_the_largest_divisor(batch_size, per_pass, passes):
  assert proxies.gradients.sequence_passes(batch_size, per_pass) == passes


def test_deterministic_for_a_seed_and_chunking():
  """Two supernets initialised from the same seed give bit-identical scores; vmapping archs in
  chunks gives the scores of the scan over archs."""
  cfg = ModelConfig(vocab_size=VOCAB, max_len=16, **FAMILIES['gpt2_bottleneck'])
  space = Space(cfg, space_config(dict(num_layers=1, hidden=[18, 26], heads=[2, 3],
                                       head_dim=[4], ffn=[10, 22])), seq_len=11)
  archs = space.sample(jax.random.key(0), 3)
  data = batches(cfg, seed=4)
  scores = [proxies.score_archs(Model(cfg, space.cfg.supernet_dims(), rngs=nnx.Rngs(11)), space,
                                archs, data, names=('wpca',))['wpca'] for _ in range(2)]
  np.testing.assert_array_equal(scores[0], scores[1])
  assert np.all(scores[0] > 0)
  model = Model(cfg, space.cfg.supernet_dims(), rngs=nnx.Rngs(11))
  vmapped = proxies.score_archs(model, space, archs, data, {'chunk': 2}, names=('wpca',))
  np.testing.assert_array_equal(vmapped['wpca'], scores[0])


def test_jacobian_with_the_loss_gradient_equals_the_jacobian_alone():
  """jacob_cov computed in the same backward step as the loss-gradient proxies (one forward, two
  backward passes) equals jacob_cov alone (a plain `jax.grad`), on one pass over a minibatch of
  16 x 128 tokens with a vocabulary of 8192 and in passes of 4 sequences; the loss-gradient
  proxies do not depend on the passes either. At these shapes (2^25 cotangent entries) a vmapped
  VJP over the two cotangents mixed them on XLA:CPU (jacobian 10-30% wrong)."""
  cfg = ModelConfig(vocab_size=8192, max_len=128, **FAMILIES['bert_post'])
  space = Space(cfg, space_config(dict(num_layers=1, hidden=[16], heads=[2], head_dim=[8],
                                       ffn=[16], blocks=['transformer'])), seq_len=128)
  model = init_model(cfg, space.cfg.supernet_dims(), seed=5)
  rng = np.random.default_rng(2)
  data = [{'tokens': rng.integers(0, 8192, (16, 128)).astype(np.int32),
           'targets': rng.integers(0, 8192, (16, 128)).astype(np.int32),
           'weights': (rng.random((16, 128)) < 0.15).astype(np.float32),
           'token_types': np.zeros((16, 128), np.int32)}]
  arch = space.largest()
  one_pass = {'backward_batch': 0, 'num_batches': 1}
  alone = proxies.score_archs(model, space, arch, data, one_pass, names=('jacob_cov',))
  names = ('snip', 'grad_norm', 'jacob_cov')
  one = proxies.score_archs(model, space, arch, data, one_pass, names=names)
  four = proxies.score_archs(model, space, arch, data, {'backward_batch': 4, 'num_batches': 1},
                             names=names)
  np.testing.assert_allclose(one['jacob_cov'], alone['jacob_cov'], rtol=1e-4)
  for name in names:
    np.testing.assert_allclose(four[name], one[name], rtol=1e-4, err_msg=name)
