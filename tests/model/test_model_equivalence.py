"""The invariant that holds the project together: a masked sub-network computes exactly what its
exported dense model computes, and the analytic parameter count is the exported model's."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import export
from elastic_jax.config import ModelConfig, check_compatible, space_config
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

# Family variants: together they cover both kinds and every knob (GQA, rotary, post-norm, swiglu,
# factorised embedding, bottleneck and skip blocks, layer subsets, norms, heads, token types).
FAMILIES = {
    'gpt2': dict(kind='decoder', positions='learned', norm='layernorm', mlp='gelu_tanh'),
    'llama_gqa': dict(kind='decoder', positions='rotary', norm='rmsnorm', mlp='swiglu',
                      use_bias=False),
    'qwen2_qkv_bias': dict(kind='decoder', positions='rotary', norm='rmsnorm', mlp='swiglu',
                           use_bias=False, qkv_bias=True, tie_embeddings=False),
    'bert_post': dict(kind='encoder', positions='learned', norm='layernorm',
                      norm_placement='post', mlp='gelu', head_transform=True, output_bias=True,
                      type_vocab_size=2, pooler=True),
    'mobilebert': dict(kind='encoder', positions='learned', norm='nonorm', norm_placement='post',
                       mlp='relu', embed_dim=10, head_transform=True, output_bias=True,
                       type_vocab_size=2),
    'albert_rotary': dict(kind='encoder', positions='rotary', norm='layernorm', mlp='swiglu',
                          embed_dim=12, tie_embeddings=False),
    'decoder_factor_post': dict(kind='decoder', positions='rotary', norm='rmsnorm',
                                norm_placement='post', mlp='gelu', embed_dim=14,
                                tie_embeddings=True),
    'decoder_untied_nopos': dict(kind='decoder', positions='none', norm='layernorm', mlp='relu',
                                 tie_embeddings=False, output_bias=True),
    'encoder_untied_pre': dict(kind='encoder', positions='learned', norm='rmsnorm', mlp='swiglu',
                               tie_embeddings=False, head_transform=True, use_bias=False),
}
SPACE = dict(num_layers=3, hidden=[18, 26, 34], depth=[1, 2, 3],
             blocks=['transformer', 'bottleneck', 'skip'], heads=[2, 3, 6], kv_groups=[1, 2, 3],
             head_dim=[4, 6], ffn=[10, 22, 34], inner=[8, 14], bottleneck_head_dim=4)
ARCHS_PER_FAMILY = 24  # x 9 families = 216 random architectures
VOCAB = 53


# Spaces whose heads-per-KV-group ratio is one for every architecture: attention reads the groups
# without a gather (SPACE's ratio varies: 2 / 1, 3 / 3, 6 / 2, ...; each head's group is gathered).
STATIC_RATIO_SPACES = {
    'multi-head': ({**SPACE, 'kv_groups': []}, 1),
    'gqa, one ratio': ({**SPACE, 'heads': [6], 'kv_groups': [2]}, 3),
}


def build(family: str, seed: int, dtype: str = 'float32', space: dict = SPACE, **model):
  cfg = ModelConfig(vocab_size=VOCAB, max_len=16, dtype=dtype, param_dtype=dtype,
                    **FAMILIES[family], **model)
  space_cfg = space_config(space)
  check_compatible(cfg, space_cfg)
  space = Space(cfg, space_cfg, seq_len=11)
  model = randomize(Model(cfg, space_cfg.supernet_dims(), rngs=nnx.Rngs(seed)), seed + 1)
  return cfg, space, model


def random_batch(cfg: ModelConfig, seed: int, b: int = 2, t: int = 11) -> dict:
  k1, k2 = jax.random.split(jax.random.key(seed))
  batch = {'tokens': jax.random.randint(k1, (b, t), 0, cfg.vocab_size)}
  # Two packed documents in row 0, padding at the end of row 1.
  batch['segment_ids'] = jnp.asarray([[1] * 6 + [2] * (t - 6), [1] * (t - 3) + [0] * 3])
  batch['positions'] = jnp.asarray([list(range(6)) + list(range(t - 6)), list(range(t))])
  if cfg.type_vocab_size:
    batch['token_types'] = jax.random.randint(k2, (b, t), 0, cfg.type_vocab_size)
  return batch


def rel_err(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def check_masked_equals_exported(family: str, space: dict = SPACE, n_archs: int = ARCHS_PER_FAMILY,
                                 kv_ratio: int = 0, **model):
  # In float64, so that the bound tests the maths and not rounding: in float32 the masked and the
  # dense model sum in different orders, and an ill-conditioned random arch (MobileBERT's
  # normless post-norm: logits in the hundreds) differs by 1e-5 of its largest logit, about as
  # much as the dense model jitted differs from itself run op by op.
  with jax.enable_x64(True):
    cfg, space, model = build(family, seed=len(family), dtype='float64', space=space, **model)
    ratios = {block.attn.kv_ratio for layer in model.layers for block in layer.blocks.values()}
    assert ratios == {kv_ratio}  # the attention path under test
    batch = random_batch(cfg, seed=3)
    archs = space.sample(jax.random.key(zlib.crc32(family.encode())), n_archs)
    # One compiled, vmapped call for the whole population of masked sub-networks.
    graphdef, state = nnx.split(model)
    masked = jax.jit(jax.vmap(lambda s, a: nnx.merge(graphdef, s)(batch, a), in_axes=(None, 0)))
    logits_PxBxTxV = masked(state, archs)
    assert logits_PxBxTxV.dtype == jnp.float64
    params = jax.vmap(lambda a: space.cost(a)['params'])(archs)
    for i, arch in enumerate(arch_lib.unstack(archs)):
      dense = export.export(model, space.cfg, arch)
      err = rel_err(logits_PxBxTxV[i], dense(batch))
      assert err <= 1e-12, (family, arch_lib.to_json(arch), err)
      assert int(params[i]) == export.param_count(dense), arch_lib.to_json(arch)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_masked_supernet_equals_exported_dense_model(family):
  check_masked_equals_exported(family)


@pytest.mark.parametrize('space', list(STATIC_RATIO_SPACES))
@pytest.mark.parametrize('family', ['llama_gqa', 'bert_post'])
def test_masked_equals_exported_where_heads_read_kv_groups_without_a_gather(family, space):
  space, ratio = STATIC_RATIO_SPACES[space]
  check_masked_equals_exported(family, space, n_archs=12, kv_ratio=ratio)


def test_largest_and_smallest_arch_export():
  cfg, space, model = build('llama_gqa', seed=0)
  batch = random_batch(cfg, seed=4)
  for arch in (space.largest(), space.smallest()):
    dense = export.export(model, space.cfg, arch)
    assert rel_err(model(batch, arch), dense(batch)) <= 1e-5
    assert int(space.cost(arch)['params']) == export.param_count(dense)
  # The largest arch exports the whole supernet's transformer weights.
  largest = export.export(model, space.cfg, space.largest())
  assert largest.dims.hidden == max(SPACE['hidden'])


def test_inactive_layer_is_exact_identity():
  """Post-norm rewrites x, so an off layer must select x, not add a zero delta."""
  cfg, space, model = build('bert_post', seed=1)
  batch = random_batch(cfg, seed=5)
  a = space.largest()
  skipped = a.replace(block=a.block.at[1].set(2))
  shallow = a.replace(depth=jnp.int32(1))
  both_off = a.replace(block=a.block.at[1].set(2).at[2].set(2))
  np.testing.assert_array_equal(model(batch, shallow), model(batch, both_off))
  assert rel_err(model(batch, skipped), model(batch, a)) > 1e-3


def test_sliced_weights_are_the_only_ones_used():
  """Changing a weight outside the active slice leaves the sub-network's output unchanged."""
  cfg, space, model = build('gpt2', seed=2)
  batch = random_batch(cfg, seed=6)
  arch = space.smallest()
  before = model(batch, arch)
  ffn = model.layers[0].blocks['transformer'].mlp
  ffn.up[...] = ffn.up[...].at[:, -1].add(5.0)  # the widest FFN column is inactive
  model.embed.positions[...] = model.embed.positions[...].at[:, -1].add(5.0)  # inactive feature
  np.testing.assert_array_equal(before, model(batch, arch))


@pytest.mark.parametrize('skip', [True, False])
def test_head_and_ffn_blocks_beyond_the_active_sizes_are_never_computed(skip):
  """Query-head blocks and FFN column blocks past an arch's choice are skipped (`lax.cond`), not
  masked: NaN weights there (NaN * 0 is NaN) leave the sub-network's output bit for bit. With
  `model.skip_width_blocks` off they are one block each, computed and masked: NaN."""
  cfg, space, model = build('gpt2', seed=3, skip_width_blocks=skip)
  batch = random_batch(cfg, seed=7)
  arch = space.smallest()  # 2 of [2, 3, 6] heads, FFN 10 of [10, 22, 34] in every layer
  arch = arch.replace(block=arch.block.at[0].set(0))  # a transformer block in layer 0
  before = model(batch, arch)
  nan = jnp.float32(jnp.nan)
  for layer in model.layers:
    block = layer.blocks['transformer']
    attn, mlp = block.attn, block.mlp
    assert attn.head_bounds == (((0, 2), (2, 3), (3, 6)) if skip else ((0, 6),))
    assert mlp.bounds == (((0, 10), (10, 22), (22, 34)) if skip else ((0, 34),))
    attn.q[...] = attn.q[...].at[:, 2:].set(nan)
    attn.q_bias[...] = attn.q_bias[...].at[2:].set(nan)
    attn.o[...] = attn.o[...].at[2:].set(nan)
    mlp.up[...] = mlp.up[...].at[:, 10:].set(nan)
    mlp.down[...] = mlp.down[...].at[10:].set(nan)
  if skip:
    np.testing.assert_array_equal(before, model(batch, arch))
  else:
    assert np.isnan(np.asarray(model(batch, arch))).all()
  wider = arch.replace(heads=arch.heads.at[0].set(3))
  assert np.isnan(np.asarray(model(batch, wider))).any()


@pytest.mark.parametrize('family', ['llama_gqa', 'bert_post'])
def test_masked_equals_exported_without_width_blocks(family):
  """`model.skip_width_blocks` off (every head and FFN unit computed, the inactive ones masked,
  no conditionals): the masked sub-networks still compute their exports' logits (float64)."""
  check_masked_equals_exported(family, n_archs=12, skip_width_blocks=False)


def test_remat_applies_to_unrolled_layers_and_changes_no_gradient():
  """`model.remat='full'` (the TPU configs') with the layers unrolled (`model.scan_layers` off)
  rematerialises each layer as the scan does: the gradient's program recomputes (a remat in its
  jaxpr, none without remat) and the gradient is the one without remat, for a masked
  sub-network and a dense export. (The FLOP-counting twin of `elastic-jax compile` runs the
  layers unrolled; 'dots_saveable' goes through the same lines with another policy.)"""
  remat, grads = 'full', {}
  for policy in ('none', remat):
    cfg, space, model = build('llama_gqa', seed=5, scan_layers=False, remat=policy)
    batch = random_batch(cfg, seed=6)
    arch = arch_lib.unstack(space.sample(jax.random.key(3), 1))[0]
    for name, net, a in (('masked', model, arch), ('dense', export.export(model, space.cfg, arch),
                                                   None)):
      graphdef, params, rest = nnx.split(net, nnx.Param, ...)
      loss = lambda p, g=graphdef, r=rest, a=a, b=batch: jnp.mean(nnx.merge(g, p, r)(b, a) ** 2)
      jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
      recomputes = 'remat' in jaxpr or 'checkpoint[' in jaxpr  # the primitive: remat2 today
      assert recomputes == (policy != 'none'), (name, policy)
      grads[policy, name] = jax.jit(jax.grad(loss))(params)
  for name in ('masked', 'dense'):
    for want, got in zip(jax.tree.leaves(grads['none', name]), jax.tree.leaves(grads[remat, name]),
                         strict=True):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_every_block_type_and_knob_is_covered():
  """Guards the property test's coverage: each family knob value appears in some family."""
  values = {k: {fam.get(k) for fam in FAMILIES.values()} for k in
            ('kind', 'positions', 'norm', 'norm_placement', 'mlp')}
  assert values['kind'] >= {'encoder', 'decoder'}
  assert values['positions'] >= {'learned', 'rotary', 'none'}
  assert values['norm'] >= {'layernorm', 'rmsnorm', 'nonorm'}
  assert values['norm_placement'] >= {'post'}
  assert values['mlp'] >= {'gelu', 'gelu_tanh', 'relu', 'swiglu'}
  assert any(f.get('qkv_bias') for f in FAMILIES.values())
  assert any(f.get('pooler') for f in FAMILIES.values())
  assert any(f.get('embed_dim') for f in FAMILIES.values())
  assert len(FAMILIES) * ARCHS_PER_FAMILY >= 200
  assert set(itertools.chain(SPACE['blocks'])) == {'transformer', 'bottleneck', 'skip'}


@pytest.mark.parametrize('family', ['llama_gqa', 'mobilebert'])
def test_features_only_forward_equals_the_full_forward(family):
  """`Model.features` skips the head and the last active layer's FFN; what it returns must be
  what the full forward captures, for masked sub-networks (one at a time and vmapped) and for
  their exported dense models."""
  cfg, space, model = build(family, seed=7)
  batch = random_batch(cfg, seed=5)
  names = ('ffn_in', 'ffn_kernel', 'attn_probs')
  graphdef, state = nnx.split(model)
  full = jax.jit(lambda s, a: nnx.merge(graphdef, s)(batch, a, capture=names)[1])
  feats = jax.jit(lambda s, a: nnx.merge(graphdef, s).features(batch, a, capture=names))
  archs = space.sample(jax.random.key(11), 4)
  for arch in arch_lib.unstack(archs):
    want, got = full(state, arch), feats(state, arch)
    for name in names:
      for w, g in zip(want[name], got[name]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    dense = export.export(model, space.cfg, arch)
    dense_feats = dense.features(batch, capture=names)
    dense_full = dense(batch, capture=names)[1]
    for name in names:
      for w, g in zip(dense_full[name], dense_feats[name]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  vmapped = jax.jit(jax.vmap(lambda s, a: nnx.merge(graphdef, s).features(batch, a, names),
                             in_axes=(None, 0)))(state, archs)
  looped = [feats(state, a) for a in arch_lib.unstack(archs)]
  for i in range(4):
    for name in names:
      for layer in range(len(looped[i][name])):
        np.testing.assert_allclose(np.asarray(vmapped[name][layer][i]),
                                   np.asarray(looped[i][name][layer]), rtol=1e-4, atol=1e-5)
