"""The training step's dense slices (train.dense_static_archs): the sub-networks every step trains
(the sandwich's largest and smallest, a fixed arch, anchors) run as their dense models, sliced
from the supernet inside the step, instead of masked at the supernet's sizes.

The reference is the masked step, itself checked against per-architecture losses written out by
hand (tests/train/test_train_step.py): with slices the loss and the gradient with respect to the
supernet's parameters are the same (float64, 1e-12), on random architectures of families that
cover every knob (GQA with a varying heads-per-group ratio, rotary, factorised embeddings,
bottleneck and skip blocks, post-norm encoders), unchunked and chunked vocabulary losses, and with
every feature-distillation loss (the dense slices' features laid out as the masked supernet's,
equal to its features to 1e-12). And the slices are what runs: the sliced program does fewer
FLOPs, and slicing another arch than the sampler's changes the loss.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_config, randomize
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import export
from elastic_jax.config import ModelConfig, check_compatible, space_config
from elastic_jax.errors import UserError
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space
from elastic_jax.train import config as train_config
from elastic_jax.train import distill
from elastic_jax.train.sampling import Sampler
from elastic_jax.train.step import DistillSpec, make_loss_fn, masked_layout, token_totals
from elastic_jax.train.trainer import dense_slices
from elastic_jax.workdir import build_space

FAMILIES = {
    'llama_gqa': dict(kind='decoder', positions='rotary', norm='rmsnorm', mlp='swiglu',
                      use_bias=False),
    'mobilebert': dict(kind='encoder', positions='learned', norm='nonorm', norm_placement='post',
                       mlp='relu', embed_dim=10, head_transform=True, output_bias=True,
                       type_vocab_size=2),
    'bert_post_untied': dict(kind='encoder', positions='learned', norm='layernorm',
                             norm_placement='post', mlp='gelu', head_transform=True,
                             output_bias=True, type_vocab_size=2, tie_embeddings=False),
}
SPACE = dict(num_layers=3, hidden=[18, 26, 34], depth=[1, 2, 3],
             blocks=['transformer', 'bottleneck', 'skip'], heads=[2, 3, 6], kv_groups=[1, 2, 3],
             head_dim=[4, 6], ffn=[10, 22, 34], inner=[8, 14], bottleneck_head_dim=4)
VOCAB, B, T = 29, 3, 9


def build(family: str):
  cfg = ModelConfig(vocab_size=VOCAB, max_len=16, dtype='float64', param_dtype='float64',
                    **FAMILIES[family])
  space_cfg = space_config(SPACE)
  check_compatible(cfg, space_cfg)
  space = Space(cfg, space_cfg, seq_len=T)
  model = randomize(Model(cfg, space_cfg.supernet_dims(), rngs=nnx.Rngs(7)), 8, scale=0.2)
  return cfg, space, model


def batch_of(cfg: ModelConfig, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  batch = {'tokens': rng.integers(0, VOCAB, (B, T)), 'targets': rng.integers(0, VOCAB, (B, T)),
           'weights': (rng.random((B, T)) < 0.8).astype(np.float32),
           'segment_ids': np.asarray([[1] * 5 + [2] * 4, [1] * 9, [1] * 6 + [0] * 3]),
           'positions': np.asarray([list(range(5)) + list(range(4))] + [list(range(T))] * 2)}
  if cfg.type_vocab_size:
    batch['token_types'] = rng.integers(0, 2, (B, T))
  return {k: jnp.asarray(v) for k, v in batch.items()}


def in_place_spec(space, features: bool = False) -> DistillSpec:
  """In-place distillation of logits, and with `features` of every feature loss (hidden states,
  attention, ELM's block-preserving loss on embeddings and block outputs)."""
  f = 0.8 if features else 0.0
  weights = {'ce': 0.6, 'logits_kl': 1.4, 'hidden_mse': f, 'attn_kl': f / 2,
             'block_preserving': f * 1.5}
  return DistillSpec(weights=weights, temperature=1.5, in_place=True,
                     layer_map=tuple(range(space.num_layers)),
                     teacher_heads=tuple(int(h) for h in space.largest().heads))


def value_and_grad(model, space, archs, batch, slices, logits_chunk=0, features=False):
  graphdef, params = nnx.split(model, nnx.Param)
  proj_graphdef, proj = nnx.split(distill.Projections({}, rngs=nnx.Rngs(0)), nnx.Param)
  loss_fn = make_loss_fn(graphdef, proj_graphdef, in_place_spec(space, features),
                         logits_chunk=logits_chunk, slices=slices)
  totals = token_totals(batch)
  state = nnx.State({'model': params, 'proj': proj})
  fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, archs, None, totals), has_aux=True))
  compiled = fn.lower(state).compile()
  (_, (per_arch, _)), grads = compiled(state)
  return per_arch, grads['model'], compiled.cost_analysis()['flops']


def assert_close(got, want, rtol):
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
  assert scale > 0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=rtol * scale)


# Two families for the step, one loss path each (two compiles each; the slices' features in
# the masked layout are checked for every family below): GQA with rotary positions on the whole
# logits (the configs' default, train.logits_chunk=0), and a factorised, normless post-norm
# encoder with bottleneck blocks on chunks of 4 positions (the last short) with every feature loss.
@pytest.mark.parametrize('family,chunk,features', [('llama_gqa', 0, False),
                                                   ('mobilebert', 4, True)])
def test_dense_slices_give_the_masked_steps_loss_and_gradient(family, chunk, features):
  """Sub-networks 0 and 1 (the in-place teacher and a student) sliced, 2 and 3 masked; random
  architectures (sub-network 0 is a random one too: the slices need not be the largest)."""
  with jax.enable_x64(True):
    cfg, space, model = build(family)
    archs = space.sample(jax.random.key(len(family)), 4)
    static = arch_lib.unstack(archs)[:2]
    slices = tuple(export.slicer(space.cfg, a) for a in static)
    batch = batch_of(cfg, 1 + features)
    want, want_grads, masked_flops = value_and_grad(model, space, archs, batch, (), chunk,
                                                    features)
    got, grads, sliced_flops = value_and_grad(model, space, archs, batch, slices, chunk, features)
    tol = 1e-12
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol)
    assert_close(grads, want_grads, tol)
    # The slices are what runs: the dense sub-networks cost fewer FLOPs than the masked ones.
    assert sliced_flops < masked_flops, (sliced_flops, masked_flops)
    if family == 'llama_gqa':
      # The comparison can fail: slicing an arch other than the sampler's changes the losses.
      wrong = (export.slicer(space.cfg, static[1]), slices[1])
      other, _, _ = value_and_grad(model, space, archs, batch, wrong, chunk, features)
      assert not np.allclose(np.asarray(other), np.asarray(want), rtol=1e-6)


def test_a_dense_slices_features_in_the_masked_layout_are_the_masked_supernets():
  """Every feature the distillation losses read, on random architectures (skipped layers,
  narrower widths, fewer heads, bottleneck blocks): zero-padded and placed by supernet layer, a
  skipped layer passing its input on, they are the masked supernet's (float64)."""
  capture = ('embed', 'hidden', 'attn_out', 'ffn_out', 'attn_probs')
  with jax.enable_x64(True):
    for family in FAMILIES:
      cfg, space, model = build(family)
      batch = batch_of(cfg, 4)
      inputs = {k: v for k, v in batch.items() if k not in ('targets', 'weights')}
      skipped = 0
      for arch in arch_lib.unstack(space.sample(jax.random.key(9), 8)):
        cut = export.slicer(space.cfg, arch)
        _, feats = cut(model).pre_logits(inputs, capture=capture, scan=True)
        _, want = model.pre_logits(inputs, arch, capture)
        got = masked_layout(feats, want, cut.source)
        for name in capture:
          for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]), strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)
        skipped += len(cut.source) < space.num_layers
      assert skipped  # the identity layers were exercised


@pytest.mark.parametrize('strategy', ['standard', 'sandwich', 'stratified', 'fixed', 'anchored',
                                      'random', 'random_linear'])
def test_static_archs_are_the_leading_archs_of_every_draw(strategy):
  space = build_space(load_config('quickstart', 'tiny'))
  picks = arch_lib.unstack(space.sample(jax.random.key(3), 3))
  sampler = Sampler(space, strategy, num_random=2, fixed=picks[0], anchors=picks[1:])
  static = sampler.static_archs()
  expected = {'standard': 1, 'sandwich': 2, 'stratified': 2, 'fixed': 1, 'anchored': 2}
  assert len(static) == expected.get(strategy, 0)
  for step in (0, 7):
    drawn = arch_lib.unstack(sampler(jax.random.key(11), step))
    for a, b in zip(static, drawn, strict=False):
      assert arch_lib.to_json(a) == arch_lib.to_json(b)


def test_dense_slices_are_off_where_the_step_needs_the_masked_supernet():
  cfg = load_config('quickstart', 'tiny')
  sampler = Sampler(build_space(cfg), 'sandwich', num_random=2)
  assert len(dense_slices(cfg, sampler, dynamic=False)) == 2
  assert dense_slices(cfg, sampler, dynamic=True) == ()  # the space changes in training
  off = ml_collections.ConfigDict(cfg.to_dict())
  off.train.dense_static_archs = False
  assert dense_slices(off, sampler, dynamic=False) == ()
  scone = ml_collections.ConfigDict(cfg.to_dict())
  scone.scone = {'enabled': True}  # the f-gram model lives in the supernet only
  assert dense_slices(scone, sampler, dynamic=False) == ()


def test_dense_static_archs_must_be_a_bool():
  values = train_config.default_config().to_dict()
  values['dense_static_archs'] = 'yes'  # a config.json edited by hand
  with pytest.raises(UserError, match=r"train.dense_static_archs='yes' must be True or False"):
    train_config.check(ml_collections.ConfigDict(values))
