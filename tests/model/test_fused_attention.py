"""The fused attention kernel (`model.attention='splash'`, run here by the Pallas interpreter):
it computes what `jax.nn.dot_product_attention` computes for the model's masks, and a supernet
using it computes, for every sub-network, what the einsum attention and the exported dense model
compute, gradients included."""

import functools
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, randomize, xla_flags_with_devices
from flax import nnx
from test_model_equivalence import FAMILIES, SPACE, STATIC_RATIO_SPACES, VOCAB, rel_err

from elastic_jax import arch as arch_lib
from elastic_jax import export
from elastic_jax.config import ModelConfig, check_compatible, space_config
from elastic_jax.errors import UserError
from elastic_jax.model.fused_attention import splash_attention
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

T = 128  # the kernel's smallest tile


def segments(b: int, t: int) -> jnp.ndarray:
  """Row 0: three packed documents; row 1: one document, then padding (segment 0)."""
  return jnp.asarray([[1] * (t // 3) + [2] * (t // 3) + [3] * (t - 2 * (t // 3)),
                      [1] * (t - 37) + [0] * 37][:b], jnp.int32)


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('heads, groups', [(4, 4), (6, 2), (3, 1)])
def test_kernel_equals_jax_dot_product_attention(causal, heads, groups):
  b, t, h = 2, 2 * T, 16
  keys = jax.random.split(jax.random.key(heads * 10 + groups), 4)
  q = jax.random.normal(keys[0], (b, t, heads, h)) / h ** 0.5
  k = jax.random.normal(keys[1], (b, t, groups, h))
  v = jax.random.normal(keys[2], (b, t, groups, h))
  w = jax.random.normal(keys[3], (b, t, heads, h))  # a random cotangent
  seg = segments(b, t)
  mask = seg[:, :, None] == seg[:, None, :]
  if causal:
    mask = mask & jnp.tril(jnp.ones((t, t), bool))
  fused = lambda q, k, v: splash_attention(q, k, v, seg, causal=causal, interpret=True)
  # The reference repeats each K/V group for its query heads itself (GQA); scale: q comes scaled.
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=1.0,
                                                           implementation='xla')
  assert rel_err(fused(q, k, v), reference(q, k, v)) < 1e-5
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
           for f in (fused, reference)]
  for got, want in zip(*grads):
    assert rel_err(got, want) < 1e-5


def test_a_length_the_kernel_cannot_tile_goes_to_the_reference():
  x = jnp.zeros((1, 100, 2, 8))
  with pytest.raises(UserError, match="multiple of 128.*model.attention='einsum'"):
    splash_attention(x, x, x, jnp.ones((1, 100), jnp.int32), causal=True, interpret=True)
  space_obj, fused = build('gpt2', 'splash_interpret', STATIC_RATIO_SPACES['multi-head'][0], 4)
  _, plain = build('gpt2', 'einsum', STATIC_RATIO_SPACES['multi-head'][0], 4)
  batch = {'tokens': jnp.arange(2 * 100).reshape(2, 100) % VOCAB}
  arch = space_obj.largest()
  assert pallas_calls(lambda a: fused(batch, a), arch) == 0
  np.testing.assert_array_equal(np.asarray(fused(batch, arch)), np.asarray(plain(batch, arch)))


def build(family: str, attention: str, space: dict, seed: int, max_len: int = T):
  cfg = ModelConfig(vocab_size=VOCAB, max_len=max_len, attention=attention, **FAMILIES[family])
  space_cfg = space_config(space)
  check_compatible(cfg, space_cfg)
  model = randomize(Model(cfg, space_cfg.supernet_dims(), rngs=nnx.Rngs(seed)), seed + 1)
  return Space(cfg, space_cfg, seq_len=T), model


def batch_of(cfg: ModelConfig, seed: int) -> dict:
  k1, k2 = jax.random.split(jax.random.key(seed))
  batch = {'tokens': jax.random.randint(k1, (2, T), 0, cfg.vocab_size),
           'segment_ids': segments(2, T)}
  if cfg.type_vocab_size:
    batch['token_types'] = jax.random.randint(k2, (2, T), 0, cfg.type_vocab_size)
  return batch


def pallas_calls(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count('pallas_call')


SPACES = {'heads per group vary (gathered)': SPACE, **{k: v[0] for k, v in
                                                       STATIC_RATIO_SPACES.items()}}


@pytest.mark.parametrize('family, space', [('gpt2', 'multi-head'),
                                           ('llama_gqa', 'gqa, one ratio'),
                                           ('bert_post', 'heads per group vary (gathered)')])
def test_supernet_with_the_kernel_equals_einsum_attention_and_the_export(family, space):
  """Causal multi-head (learned positions), grouped-query with rotary heads (the kernel per KV
  group), and bidirectional post-norm whose heads-per-group ratio varies (each head's group
  gathered): logits and every parameter's gradient, masked and exported."""
  seed = zlib.crc32(f'{family}{space}'.encode()) % 1000
  space_obj, fused = build(family, 'splash_interpret', SPACES[space], seed)
  _, plain = build(family, 'einsum', SPACES[space], seed)
  batch = batch_of(fused.cfg, seed)
  valid = batch['segment_ids'] > 0

  def loss(state, graphdef, arch):
    logits = nnx.merge(graphdef, state)(batch, arch)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch['tokens'][..., None], -1)
    return jnp.sum(jnp.where(valid, nll[..., 0], 0.0)), logits

  # One compile per model for every arch (the arch is traced).
  grad_fns = [jax.jit(functools.partial(jax.grad(loss, has_aux=True), graphdef=nnx.graphdef(m)))
              for m in (fused, plain)]
  states = [nnx.state(m) for m in (fused, plain)]
  largest = space_obj.largest()
  assert pallas_calls(lambda s: grad_fns[0].__wrapped__(s, arch=largest), states[0]) > 0
  for arch in arch_lib.unstack(space_obj.sample(jax.random.key(seed), 2)):
    (g_fused, got), (g_plain, want) = (f(s, arch=arch) for f, s in zip(grad_fns, states))
    assert rel_err(got[valid], want[valid]) < 1e-5, arch_lib.to_json(arch)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_fused), nnx.to_flat_state(g_plain)):
      assert float(jnp.max(jnp.abs(a[...] - b[...]))) <= 1e-4 * max(
          float(jnp.max(jnp.abs(b[...]))), 1.0), path
    dense = export.export(fused, space_obj.cfg, arch)  # also on the kernel
    assert rel_err(jax.jit(dense)(batch)[valid], got[valid]) < 1e-5, arch_lib.to_json(arch)


def test_captured_attention_probabilities_fall_back_to_the_einsum_path():
  space_obj, fused = build('gpt2', 'splash_interpret', STATIC_RATIO_SPACES['multi-head'][0], 5)
  _, plain = build('gpt2', 'einsum', STATIC_RATIO_SPACES['multi-head'][0], 5)
  batch = batch_of(fused.cfg, 5)
  arch = space_obj.largest()
  _, got = fused(batch, arch, capture=('attn_probs',))
  _, want = plain(batch, arch, capture=('attn_probs',))
  for a, b in zip(got['attn_probs'], want['attn_probs']):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


SHARDED = textwrap.dedent('''
  import jax, jax.numpy as jnp
  from elastic_jax import parallel
  from elastic_jax.model.fused_attention import splash_attention
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
  b, t, n, g, h = 8, 128, 4, 2, 16
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (b, t, x, h)) for key, x in zip(keys, (n, g, g)))
  seg = jnp.ones((b, t), jnp.int32).at[1, 100:].set(0)
  attend = lambda q, k, v, s: splash_attention(q, k, v, s, causal=True, interpret=True)
  one = jax.jit(attend)(q, k, v, seg)
  rows = NamedSharding(mesh, P(parallel.BATCH_AXES, None, 'tensor'))
  put = lambda x: jax.device_put(x, rows)
  step = jax.jit(parallel.on_mesh(attend, mesh))
  args = (put(q), put(k), put(v), jax.device_put(seg, parallel.batch_sharding(mesh)))
  text = step.lower(*args).as_text()
  sharded = step(*args)
  print('sdy.manual_computation' in text, float(jnp.max(jnp.abs(sharded - one))))
''')


def test_on_a_mesh_the_kernel_runs_per_shard_and_equals_one_device():
  out = subprocess.run([sys.executable, '-c', SHARDED], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ,
                            'XLA_FLAGS': xla_flags_with_devices(8), 'JAX_PLATFORMS': 'cpu'},
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  in_shard_map, err = out.stdout.split()
  assert in_shard_map == 'True' and float(err) < 1e-6


def test_splash_runs_the_kernel_only_in_programs_for_tpu():
  """On this CPU, a 'splash' model runs the einsum path (a config or export naming it works
  anywhere); compiled for a TPU slice (on its mesh, as the trainer and `elastic-jax compile` do),
  its forward and backward run the kernel and hold no [B, heads, T, T] array."""
  space_obj, model = build('gpt2', 'splash', STATIC_RATIO_SPACES['multi-head'][0], 9, 2 * T)
  _, plain = build('gpt2', 'einsum', STATIC_RATIO_SPACES['multi-head'][0], 9, 2 * T)
  batch = batch_of(model.cfg, 9)
  arch = space_obj.largest()
  assert pallas_calls(lambda a: model(batch, a), arch) == 0
  np.testing.assert_array_equal(np.asarray(model(batch, arch)), np.asarray(plain(batch, arch)))

  pytest.importorskip('libtpu')
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from elastic_jax import parallel
  devices = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2').devices
  mesh = Mesh(np.asarray(devices).reshape(1, 4, 1), parallel.AXES)
  graphdef, state = nnx.split(model)
  rows = NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXES))
  t = 2 * T  # not the kernel's lane width (128), which its softmax statistics are padded to
  shapes = {k: jax.ShapeDtypeStruct((8, t), v.dtype, sharding=rows) for k, v in batch.items()}
  grad = jax.grad(lambda s, b: jnp.sum(nnx.merge(graphdef, s)(b, arch)))
  compiled = jax.jit(parallel.on_mesh(grad, mesh)).lower(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                  sharding=parallel.replicated(mesh)), state),
      shapes).compile().as_text()
  assert 'tpu_custom_call' in compiled
  assert f',{t},{t}]' not in compiled  # no scores or probabilities of a [.., T, S] shape
