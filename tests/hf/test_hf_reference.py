"""`transformers` as the referee of the model code: imports compute its logits, and exported
sub-networks load into it and compute the masked supernet's logits."""

from __future__ import annotations

import hf_testing as H  # noqa: I001  (skips this module without the hf extra)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import export as export_lib
from elastic_jax.config import space_config
from elastic_jax.errors import UserError
from elastic_jax.hf import convert
from elastic_jax.hf import space as hf_space
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

TOL = 1e-4
SUBNETS = 20


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  return {f: H.save_model(f, root / f, seed=i) for i, f in enumerate(H.FAMILIES)}


@pytest.mark.parametrize('family', H.FAMILIES)
def test_import_computes_transformers_logits(family, checkpoints):
  batch = H.padded_batch(family, seed=1)
  reference = H.reference_logits(checkpoints[family], batch)
  imported = convert.load_dense(checkpoints[family])
  logits = imported.model({k: jnp.asarray(v) for k, v in H.ours(batch).items()})
  assert H.max_scaled_diff(logits, reference, batch['attention_mask']) <= TOL
  assert imported.initialised == []
  if family == 'bert':
    assert imported.not_imported == sorted(n for n in imported.not_imported
                                           if n.startswith('cls.seq_relationship'))
    assert imported.not_imported  # the next-sentence head is reported, not silently lost


def test_bert_hidden_states_and_pooler_equal_transformers(checkpoints):
  import torch
  import transformers
  batch = H.padded_batch('bert', seed=2)
  ref = transformers.AutoModel.from_pretrained(str(checkpoints['bert'])).eval()
  with torch.no_grad():
    out = ref(input_ids=torch.as_tensor(batch['tokens'], dtype=torch.long),
              attention_mask=torch.as_tensor(batch['attention_mask']),
              token_type_ids=torch.as_tensor(batch['token_types'], dtype=torch.long))
  model = convert.load_dense(checkpoints['bert']).model
  hidden, pooled = model.hidden_states({k: jnp.asarray(v) for k, v in H.ours(batch).items()},
                                       pooled=True)
  assert H.max_scaled_diff(hidden, out.last_hidden_state.numpy(), batch['attention_mask']) <= TOL
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=TOL)


def _supernet(directory):
  """The supernet an import makes (layer subsets on, fine width steps), holding the original."""
  imported = convert.load_dense(directory)
  hf_cfg = hf_space.default_config()
  hf_cfg.layer_subsets = True
  hf_cfg.round_to = 4
  space_cfg = space_config(hf_space.derive(imported.shape, hf_cfg))
  space = Space(imported.model.cfg, space_cfg, seq_len=13)
  supernet = Model(imported.model.cfg, space_cfg.supernet_dims(), rngs=nnx.Rngs(0))
  original = arch_lib.from_json(hf_space.original_arch(imported.shape, space_cfg.num_layers),
                                space_cfg)
  export_lib.import_dense(supernet, space_cfg, original, imported.model)
  return imported, space, supernet, original


@pytest.mark.parametrize('family', H.FAMILIES)
def test_random_subnetworks_export_to_transformers(family, checkpoints, tmp_path):
  imported, space, supernet, original = _supernet(checkpoints[family])
  batch = H.padded_batch(family, seed=3)
  inputs = {k: jnp.asarray(v) for k, v in H.ours(batch).items()}
  # The original is the largest sub-network: the supernet computes its logits as imported.
  largest = supernet(inputs, space.largest())
  np.testing.assert_array_equal(np.asarray(space.largest().hidden), imported.shape.hidden)
  assert H.max_scaled_diff(largest, H.reference_logits(checkpoints[family], batch),
                           batch['attention_mask']) <= TOL
  archs = arch_lib.unstack(space.sample(jax.random.key(7), 4 * SUBNETS))
  graphdef, state = nnx.split(supernet)
  masked = jax.jit(lambda s, a: nnx.merge(graphdef, s)(inputs, a))
  exported, refused, kinds = 0, 0, set()
  for arch in archs:
    dense = export_lib.export(supernet, space.cfg, arch)
    out = tmp_path / f'sub{exported + refused}'
    try:
      report = convert.save_dense(dense, out, base=imported.hf_config)
    except UserError as e:
      # Only GPT-2 and BERT refuse, and only sub-networks whose attention is wider than hidden.
      assert family in ('gpt2', 'bert') and 'ties the attention width' in str(e), str(e)
      assert not out.exists()
      refused += 1
      continue
    reference = H.reference_logits(out, batch)
    err = H.max_scaled_diff(masked(state, arch), reference, batch['attention_mask'])
    assert err <= TOL, (family, arch_lib.to_json(arch), err)
    assert report['params_real'] == int(space.cost(arch)['params'])
    kinds.add(('padded' if report['padded'] else 'uniform',
               len(dense.dims.layers) < space.num_layers))
    exported += 1
    if exported == SUBNETS:
      break
  assert exported == SUBNETS, (exported, refused)
  # The sample exercised heterogeneous (zero-padded) layers and removed layers.
  assert {k[0] for k in kinds} == {'padded', 'uniform'} or family in ('gpt2', 'bert')
  assert any(k[1] for k in kinds)


@pytest.mark.parametrize('family', H.FAMILIES)
def test_round_trip_gives_identical_arrays(family, checkpoints, tmp_path):
  first = convert.load_dense(checkpoints[family])
  convert.save_dense(first.model, tmp_path / 'out', base=first.hf_config)
  again = convert.load_dense(tmp_path / 'out')
  a, b = export_lib.flat_params(first.model), export_lib.flat_params(again.model)
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=str(path))


def test_grouped_kv_heads_are_replicated_when_ratios_differ():
  """Layers with 6 heads / 1 group and 6 heads / 2 groups share one config: 2 groups of 3 heads,
  the single group written twice; hand-checked against the GQA mapping."""
  from elastic_jax.config import LayerDims, ModelDims
  from elastic_jax.hf.layout import layer_key, uniform
  rng = np.random.RandomState(0)
  dims = ModelDims(hidden=5, head_dim=2, bottleneck_head_dim=0, layers=(
      LayerDims(('transformer',), heads=6, kv_groups=1, ffn=3),
      LayerDims(('transformer',), heads=3, kv_groups=1, ffn=4)))
  params = {}
  for i, l in enumerate(dims.layers):
    params[layer_key(i, 'attn.q')] = rng.randn(5, l.heads, 2)
    params[layer_key(i, 'attn.k')] = rng.randn(5, l.kv_groups, 2)
    params[layer_key(i, 'attn.v')] = rng.randn(5, l.kv_groups, 2)
    params[layer_key(i, 'attn.o')] = rng.randn(l.heads, 2, 5)
    params[layer_key(i, 'mlp.up')] = rng.randn(5, l.ffn)
    params[layer_key(i, 'mlp.down')] = rng.randn(l.ffn, 5)
  out, shape = uniform(params, dims, mha_only=False, tied_width=False, family='llama')
  assert (shape.heads, shape.kv_groups, shape.ffn) == (6, 2, 4)  # ratio gcd(6, 3) = 3
  k0, k1 = out[layer_key(0, 'attn.k')], out[layer_key(1, 'attn.k')]
  np.testing.assert_array_equal(k0[:, 0], params[layer_key(0, 'attn.k')][:, 0])
  np.testing.assert_array_equal(k0[:, 1], params[layer_key(0, 'attn.k')][:, 0])  # a copy
  np.testing.assert_array_equal(k1[:, 1], 0)  # heads 3-5 of layer 1 are padding
  np.testing.assert_array_equal(out[layer_key(1, 'attn.q')][:, 3:], 0)
  np.testing.assert_array_equal(out[layer_key(1, 'attn.o')][3:], 0)
  np.testing.assert_array_equal(out[layer_key(0, 'mlp.down')][3:], 0)


def test_sliding_window_caps_the_sequence_length(tmp_path):
  model = H.make_model('mistral')
  model.config.sliding_window = 16
  model.save_pretrained(str(tmp_path))
  imported = convert.load_dense(tmp_path)
  assert imported.model.cfg.max_len == 16
