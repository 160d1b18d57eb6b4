"""FlexiBERT blocks: masked sub-networks equal their exported dense models (200 random archs with
mixed operations per layer), the operations match independent references (NumPy FFT, SciPy DCT,
a NumPy ConvBERT dynamic convolution), and the analytic parameter count matches the reference
ELECTRA implementation's count for the benchmark's own figures."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from conftest import randomize
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import export
from elastic_jax.config import FLEXIBERT_BLOCKS, ModelConfig, check_compatible, space_config
from elastic_jax.errors import UserError
from elastic_jax.model import flexibert
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

FAMILY = dict(kind='encoder', vocab_size=37, max_len=16, positions='learned', norm='layernorm',
              norm_placement='post', norm_eps=1e-12, mlp='gelu', embed_dim=10, head_transform=True,
              output_bias=True, type_vocab_size=2)
SPACE = dict(num_layers=3, hidden=[12, 24], depth=[1, 2, 3],
             blocks=list(FLEXIBERT_BLOCKS) + ['skip'], heads=[2, 4], ffn=[10, 22],
             ffn_layers=[1, 2, 3])
NUM_ARCHS = 200


def build(seed=0, family=FAMILY, space=SPACE):
  cfg = ModelConfig(**family)
  space_cfg = space_config(space)
  check_compatible(cfg, space_cfg)
  sp = Space(cfg, space_cfg, seq_len=11)
  # Perturbation 0.1 (not the default 0.3): LT sums every position and head feature, so its
  # output's DC terms grow with the weights' scale and amplify float32 rounding (differences of
  # summation order between the masked and dense matmuls) beyond 1e-5 of the logits.
  model = randomize(Model(cfg, space_cfg.supernet_dims(), rngs=nnx.Rngs(seed)), seed + 1,
                    scale=0.1)
  return cfg, sp, model


def rel_err(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def test_masked_equals_exported_on_200_random_flexibert_archs():
  cfg, space, model = build()
  k1, k2 = jax.random.split(jax.random.key(7))
  batch = {'tokens': jax.random.randint(k1, (2, 11), 0, cfg.vocab_size),
           'segment_ids': jnp.asarray([[1] * 11, [1] * 8 + [0] * 3]),
           'token_types': jax.random.randint(k2, (2, 11), 0, 2)}
  archs = space.sample(jax.random.key(3), NUM_ARCHS)
  blocks = np.asarray(archs.block)[:, :]
  on = np.asarray(jax.vmap(lambda a: a.layer_on())(archs))
  # Coverage: every operation, every stacked-FFN depth, and layers of different operations in
  # one arch.
  ops_on = {int(b) for b, o in zip(blocks.ravel(), on.ravel()) if o}
  assert len(ops_on) == 6
  assert set(np.asarray(archs.ffn_layers).ravel()) == {1, 2, 3}
  mixed = sum(len({int(b) for b, o in zip(row_b, row_on) if o}) > 1
              for row_b, row_on in zip(blocks, on))
  assert mixed >= NUM_ARCHS // 3
  graphdef, state = nnx.split(model)
  masked = jax.jit(jax.vmap(lambda s, a: nnx.merge(graphdef, s)(batch, a), in_axes=(None, 0)))
  logits = masked(state, archs)
  params = jax.vmap(lambda a: space.cost(a)['params'])(archs)
  for i, arch in enumerate(arch_lib.unstack(archs)):
    dense = export.export(model, space.cfg, arch)
    err = rel_err(logits[i], dense(batch))
    assert err <= 1e-5, (arch_lib.to_json(arch), err)
    assert int(params[i]) == export.param_count(dense), arch_lib.to_json(arch)


def _dense_layer(kind, hidden, heads, seed=0):
  """A dense one-layer FlexiBERT model of one operation and its block."""
  cfg = ModelConfig(**FAMILY)
  space_cfg = space_config(dict(SPACE, hidden=[hidden], blocks=[kind], heads=[heads], ffn=[10],
                                ffn_layers=[1], depth=[1], num_layers=1))
  model = randomize(Model(cfg, space_cfg.supernet_dims(), rngs=nnx.Rngs(seed)), seed + 1)
  space = Space(cfg, space_cfg)
  dense = export.export(model, space_cfg, space.largest())
  return dense.layers[0].blocks[kind]


@pytest.mark.parametrize('kind', ['lt_dft', 'lt_dct'])
def test_linear_transforms_match_numpy_fft2_and_scipy_dct(kind):
  block = _dense_layer(kind, hidden=12, heads=2)
  x = np.random.default_rng(0).normal(size=(2, 7, 12)).astype(np.float32)
  ctx = type('Ctx', (), {'hidden_mask': None})()
  out = np.asarray(block.mix(jnp.asarray(x), ctx, 12, 2, {'names': ()}))
  p = x @ np.asarray(block.proj.kernel[...]) + np.asarray(block.proj.bias[...])
  heads = p.reshape(2, 7, 2, 6).transpose(0, 2, 1, 3)  # [B, N, T, H] as the reference
  if kind == 'lt_dft':
    ref = np.fft.fft2(heads.astype(np.float64)).real  # torch.fft.fft2(...).real, last two axes
  else:
    ref = scipy.fft.dctn(heads.astype(np.float64), type=2, axes=(2, 3))  # dct_2d, norm=None
  ref = ref.transpose(0, 2, 1, 3).reshape(2, 7, 12)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize('kind,k', [('dsc_5', 5), ('dsc_9', 9)])
def test_dynamic_convolution_matches_a_numpy_convbert_reference(kind, k):
  hidden, heads = 12, 4
  block = _dense_layer(kind, hidden=hidden, heads=heads, seed=1)
  rng = np.random.default_rng(1)
  b, t = 2, 11
  x = rng.normal(size=(b, t, hidden)).astype(np.float64)
  ctx = type('Ctx', (), {'hidden_mask': None, 'attn_mask_BTS': jnp.ones((b, t, t), bool)})()
  out = np.asarray(block.mix(jnp.asarray(x, jnp.float32), ctx, hidden, heads, {'names': ()}))
  w = lambda v: np.asarray(v[...], np.float64)
  a, na, d = hidden // 2, heads // 2, hidden // heads
  att = block.attn
  q, key, v = (x @ w(att.q) + w(att.q_bias), x @ w(att.k) + w(att.k_bias),
               x @ w(att.v) + w(att.v_bias))
  # Attention side: na heads of size d.
  qh, kh, vh = (m.reshape(b, t, na, d).transpose(0, 2, 1, 3) for m in (q, key, v))
  s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ctx_att = (p @ vh).transpose(0, 2, 1, 3).reshape(b, t, a)
  # Convolution side (ConvBERT): torch Conv1d(groups=hidden, padding=k//2), pointwise, bias.
  xp = np.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)))
  depth = np.stack([sum(w(block.depthwise)[j] * xp[:, i + j] for j in range(k))
                    for i in range(t)], axis=1)
  key_conv = depth @ w(block.pointwise) + w(block.pointwise_bias)
  kern = (key_conv * q) @ w(block.conv_kernel.kernel) + w(block.conv_kernel.bias)
  kern = kern.reshape(b * t * na, k, 1)
  kern = np.exp(kern - kern.max(1, keepdims=True))
  kern /= kern.sum(1, keepdims=True)
  value = x @ w(block.conv_value.kernel) + w(block.conv_value.bias)
  vp = np.pad(value, ((0, 0), ((k - 1) // 2, (k - 1) // 2), (0, 0)))
  unfold = np.stack([vp[:, j:j + t] for j in range(k)], axis=-1)  # [B, T, A, k]
  conv = (unfold.reshape(b * t * na, d, k) @ kern).reshape(b, t, a)
  ref = np.concatenate([ctx_att, conv], -1) @ np.concatenate([w(att.o), w(block.o_conv)], 0)
  ref += w(att.o_bias)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_weighted_multiplicative_attention_differs_from_sdp_only_by_the_query_map():
  block = _dense_layer('sa_wma', hidden=12, heads=2, seed=2)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 12)), jnp.float32)
  ctx = type('Ctx', (), {'hidden_mask': None, 'attn_mask_BTS': jnp.ones((1, 5, 5), bool)})()
  out = block.mix(x, ctx, 12, 2, {'names': ()})
  block.attn.wq[...] = jnp.eye(12)  # identity weight: plain scaled dot-product attention
  sdp = block.mix(x, ctx, 12, 2, {'names': ()})
  q = x @ block.attn.q[...] + block.attn.q_bias[...]
  k = x @ block.attn.k[...] + block.attn.k_bias[...]
  v = x @ block.attn.v[...] + block.attn.v_bias[...]
  ref = []
  for h in range(2):
    sl = slice(6 * h, 6 * h + 6)
    p = jax.nn.softmax(q[0, :, sl] @ k[0, :, sl].T / np.sqrt(6), axis=-1)
    ref.append(p @ v[0, :, sl])
  ref = jnp.concatenate(ref, -1) @ block.attn.o[...] + block.attn.o_bias[...]
  np.testing.assert_allclose(sdp[0], ref, rtol=1e-5, atol=1e-6)
  assert rel_err(out, sdp) > 1e-3


def test_parameter_count_matches_the_reference_electra_count(shared_data):
  """The benchmark CSV's `Number of Parameters` is the reference PyTorch ELECTRA model built with
  hidden 256 and FFN 1024 in every layer; our analytic layer counts at those sizes plus ELECTRA's
  embeddings (128-wide tables and LayerNorm, a 128 -> 256 projection) reproduce it exactly."""
  records = json.loads((shared_data / 'nas_bench_bert' / 'BERT_benchmark.json').read_text())
  csv = np.genfromtxt(shared_data / 'nas_bench_bert' / 'BERT_results_activation.csv',
                      delimiter=',', names=True)
  reported = dict(zip(csv['ID'].astype(int), csv['Number_of_Parameters'].astype(int)))
  cfg = ModelConfig(**FAMILY)
  electra_embeddings = 30522 * 128 + 512 * 128 + 2 * 128 + 2 * 128 + (128 * 256 + 256)
  for record in records[:60]:
    total = electra_embeddings
    for layer in record['hparams']['model_hparam_overrides']['nas_config']['encoder_layers']:
      op = f"{layer['operation_type']}_{layer['operation_parameter']}".lower()
      s = {'hidden': 256, 'heads': layer['num_operation_heads'], 'ffn': 1024,
           'ffn_layers': layer['num_feed_forward']}
      total += int(flexibert.FLEXIBERT_BLOCK_CLASSES[op].cost(cfg, s)['params'])
    assert total == reported[record['id']], record['id']


@pytest.mark.parametrize('block', FLEXIBERT_BLOCKS)
def test_each_operation_declares_whether_equal_tokens_stay_equal(block):
  """`averages_tokens` (SynFlow runs on one token when every block has it) is True exactly for
  the operations under which a sequence of equal input vectors stays a sequence of equal vectors:
  the attention ones; the DFT / DCT and the zero-padded convolutions make the positions differ."""
  from elastic_jax.model.blocks import equal_tokens_stay_equal
  from elastic_jax.proxies.gradients import _with_embedding

  cfg, space, model = build(space=dict(SPACE, blocks=[block], depth=[3]))
  inputs = {'tokens': jnp.zeros((1, 11), jnp.int32)}
  equal = _with_embedding(model, lambda x, mask: jnp.ones_like(x) * mask)
  logits = equal(inputs, space.largest())[0]
  same = float(jnp.max(jnp.abs(logits - logits[:1]))) <= 1e-5 * float(jnp.max(jnp.abs(logits)))
  assert equal_tokens_stay_equal(model) == same == block.startswith('sa_'), block


def test_flexibert_space_errors_are_one_clear_line():
  with pytest.raises(UserError, match='space.blocks.*sa_xyz'):
    space_config(dict(SPACE, blocks=['sa_xyz'], ffn_layers=[1]))
  with pytest.raises(UserError, match='FlexiBERT blocks need every head count to divide'):
    space_config(dict(SPACE, hidden=[10, 20]))
  with pytest.raises(UserError, match='only FlexiBERT blocks .* stack FFN layers'):
    space_config(dict(SPACE, blocks=['transformer'], ffn_layers=[1, 3]))
  with pytest.raises(UserError, match='need model.kind=encoder'):
    check_compatible(ModelConfig(**dict(FAMILY, kind='decoder', type_vocab_size=0)),
                     space_config(SPACE))


@pytest.mark.slow  # ~2 CPU-minutes: three dense exports compile every proxy
def test_proxies_of_masked_flexibert_archs_equal_their_dense_exports():
  """Every zero-cost proxy scores a masked FlexiBERT sub-network as its exported dense model."""
  from elastic_jax import proxies

  cfg, space, model = build(seed=4)
  rng = np.random.default_rng(5)
  tokens = rng.integers(0, cfg.vocab_size, (2, 3, 11)).astype(np.int32)
  weights = (rng.random((2, 3, 11)) < 0.3).astype(np.float32)
  batches = [{'tokens': tokens[k], 'targets': tokens[k], 'weights': weights[k]} for k in range(2)]
  pcfg = proxies.proxy_config({'num_batches': 2})
  archs = space.sample(jax.random.key(8), 3)
  masked = proxies.score_archs(model, space, archs, batches, pcfg)
  for i, arch in enumerate(arch_lib.unstack(archs)):
    dense = proxies.score_dense(export.export(model, space.cfg, arch), batches, pcfg)
    for name, value in dense.items():
      np.testing.assert_allclose(masked[name][i], value, rtol=2e-4, err_msg=name)
