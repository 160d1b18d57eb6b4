"""ELM's dynamic modules: width growth and head pruning change the space's limits, never the arrays'
shapes or the compiled step; CKA against a NumPy reference; resumption; bad input."""

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, randomize
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import export, space_history
from elastic_jax.config import ModelConfig, space_config
from elastic_jax.errors import UserError
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space
from elastic_jax.train import trainer
from elastic_jax.train.dynamic import config as dynamic_config
from elastic_jax.train.dynamic import growth, head_pruning
from elastic_jax.train.sampling import Sampler
from elastic_jax.workdir import build_space


def elm_cfg(data_cache, **dynamic):
  """A 2-layer BERT / bottleneck space whose FFN starts at hidden (48) and may grow to 1.5x."""
  cfg = load_config('bert_elm', 'runlocal')
  cfg.data.cache_dir = str(data_cache)
  cfg.space.num_layers = 2
  cfg.space.depth = (2,)
  cfg.space.ffn = (12, 24, 36, 48)
  cfg.data.batch_size = 4
  cfg.data.seq_len = 16
  cfg.data.eval_batches = 1
  cfg.train.steps = 8
  cfg.train.schedule = 'constant'  # a shorter first run keeps the same learning rates
  cfg.train.checkpoint_every = 3
  cfg.train.log_every = 1
  cfg.train.dynamic.growth_every = 2
  cfg.train.dynamic.calib_batches = 1
  cfg.train.distill.block_preserving = 1.0  # its features and projections resume too
  for k, v in dynamic.items():
    cfg.train.dynamic[k] = v
  return cfg


def history(workdir):
  return json.loads((workdir / space_history.HISTORY_FILE).read_text())


def params_of(workdir, cfg):
  from elastic_jax import checkpoints
  space = build_space(cfg, workdir)
  model = Model(space.model, space.cfg.supernet_dims(), rngs=nnx.Rngs(0))
  step = checkpoints.restore_params_if_any(workdir, model)
  return step, {'/'.join(map(str, p)): np.asarray(v[...])
                for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# -- linear CKA -------------------------------------------------------------------------------
def numpy_cka(x, y):
  """HSIC on centred Gram matrices (Kornblith et al. 2019, eq. 3), in float64."""
  n = x.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = x @ x.T, y @ y.T
  hsic = lambda a, b: np.trace(a @ h @ b @ h) / (n - 1) ** 2
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka_equals_the_hsic_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(37, 5))
  y = x @ rng.normal(size=(5, 7)) + 0.5 * rng.normal(size=(37, 7))
  z = rng.normal(size=(37, 3))
  for a, b in ((x, y), (x, z), (y, z), (x, x)):
    got = float(head_pruning.linear_cka(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    assert got == pytest.approx(numpy_cka(a, b), rel=1e-4, abs=1e-6)
  # Invariances CKA must have: isotropic scaling, an orthogonal map, a shift.
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  scaled = float(head_pruning.linear_cka(jnp.asarray(3 * x @ q + 2.0), jnp.asarray(y)))
  assert scaled == pytest.approx(numpy_cka(x, y), rel=1e-4)
  # Left-out rows (padding) count nowhere.
  w = (rng.random(37) > 0.3).astype(np.float32)
  got = float(head_pruning.linear_cka(jnp.asarray(x), jnp.asarray(z), jnp.asarray(w)))
  assert got == pytest.approx(numpy_cka(x[w > 0], z[w > 0]), rel=1e-4, abs=1e-6)


def test_head_cka_matrix_equals_pairwise_reference():
  rng = np.random.default_rng(1)
  h = rng.normal(size=(29, 4, 6))
  h[:, 2] = h[:, 0] @ rng.normal(size=(6, 6))  # an invertible map of head 0: CKA < 1 in general
  h[:, 3] = 0.0  # an inactive head: no variance
  got = np.asarray(head_pruning.head_cka(jnp.asarray(h, jnp.float32)))
  for i in range(3):
    for j in range(3):
      assert got[i, j] == pytest.approx(numpy_cka(h[:, i], h[:, j]), rel=1e-3, abs=1e-5)
  assert np.all(got[3] == 0) and np.all(got[:, 3] == 0)


def test_choose_heads_greedy_then_divisibility():
  cka = np.eye(6)
  cka[0, 3] = cka[3, 0] = 0.95  # head 3 repeats head 0
  cka[1, 4] = cka[4, 1] = 0.85  # below the threshold
  kept, dropped = head_pruning.choose_heads(cka, 6, 0.9, None)
  assert (kept, dropped) == ([0, 1, 2, 4, 5], [3])
  kept, dropped = head_pruning.choose_heads(cka, 6, 0.9, 48)  # 5 does not divide 48: 4 does
  assert (kept, dropped) == ([0, 1, 2, 4], [3, 5])
  assert head_pruning.choose_heads(cka, 6, 1.0, None) == (list(range(6)), [])


# -- head pruning on a model --------------------------------------------------------------------
def test_duplicated_head_is_pruned_and_its_weights_move_behind():
  cfg = ModelConfig(kind='encoder', vocab_size=41, max_len=16, norm_placement='post')
  space = Space(cfg, space_config(dict(num_layers=1, hidden=[24], heads=[4], ffn=[10])))
  model = randomize(Model(cfg, space.cfg.supernet_dims(), rngs=nnx.Rngs(0)), 1)
  attn = model.layers[0].blocks['transformer'].attn
  for name in ('q', 'q_bias'):  # head 2 := head 0 (its keys and values read group 2 = head 2)
    p = getattr(attn, name)
    p[...] = p[...].at[..., 2, :].set(p[...][..., 0, :]) if name == 'q' else \
        p[...].at[2].set(p[...][0])
  for name in ('k', 'v'):
    p = getattr(attn, name)
    p[...] = p[...].at[:, 2].set(p[...][:, 0])
  for name in ('k_bias', 'v_bias'):
    p = getattr(attn, name)
    p[...] = p[...].at[2].set(p[...][0])
  attn.o[...] = attn.o[...].at[2].set(attn.o[...][0])
  graphdef, params = nnx.split(model, nnx.Param)
  batch = {'tokens': jax.random.randint(jax.random.key(0), (3, 13), 0, 41)}
  cka = np.asarray(head_pruning.make_head_cka(graphdef)(params, batch,
                                                        arch_lib.stack([space.largest()])))[0, 0]
  assert cka[0, 2] == pytest.approx(1.0, abs=1e-5)
  assert max(cka[0, 1], cka[0, 3], cka[1, 3]) < 0.9  # independent random heads
  kept, dropped = head_pruning.choose_heads(cka, 4, 0.9, None)
  assert (kept, dropped) == ([0, 1, 3], [2])

  order = np.asarray(kept + dropped)
  names = head_pruning.param_names(params)
  tree = {'model': params}
  moved = head_pruning.permute_heads(tree, names, 0, 'transformer', order)['model']
  old = attn.q[...]
  new_q = moved['layers'][0]['blocks']['transformer']['attn']['q'][...]
  np.testing.assert_array_equal(new_q, old[:, order])
  new_o = moved['layers'][0]['blocks']['transformer']['attn']['o'][...]
  np.testing.assert_array_equal(new_o, attn.o[...][order])
  # The 3 kept heads are now the prefix: the 3-head sub-network of the permuted model computes
  # what heads {0, 1, 3} of the original compute (head 2 masked by zeroing its output rows).
  permuted = nnx.merge(graphdef, moved)
  three = space.largest().replace(heads=jnp.asarray([3], jnp.int32))
  ref_model = nnx.merge(graphdef, params)
  ref_attn = ref_model.layers[0].blocks['transformer'].attn
  ref_attn.o[...] = ref_attn.o[...].at[2].set(0.0)
  np.testing.assert_allclose(permuted(batch, three), ref_model(batch, space.largest()),
                             rtol=1e-5, atol=1e-5)


# -- the space's limits ------------------------------------------------------------------------
def test_grown_space_subnetworks_equal_their_exports():
  cfg = ModelConfig(kind='encoder', vocab_size=41, max_len=16, norm_placement='post',
                    embed_dim=8, head_transform=True, output_bias=True, type_vocab_size=2)
  base = dict(num_layers=3, hidden=[16], heads=[2, 4], blocks=['transformer', 'bottleneck'],
              ffn=[4, 8, 12, 16, 20, 24], inner=[8], head_dim=[4], bottleneck_head_dim=2)
  # Layer 1's transformer FFN grew to 24, the rest are at the initial 16; layer 2's bottleneck
  # lost heads down to 3 (a count pruning leaves, outside the configured (2, 4)).
  limits = dict(ffn_max=[[16, 16], [24, 16], [16, 20]],
                heads_allowed=[[[2, 4], [2, 4]], [[2, 4], [2, 4]], [[2, 4], [1, 3]]])
  space = Space(cfg, space_config({**base, 'heads': [1, 2, 3, 4], **limits}), seq_len=11)
  model = randomize(Model(cfg, space.cfg.supernet_dims(), rngs=nnx.Rngs(3)), 4)
  a = jax.tree.map(np.asarray, space.sample(jax.random.key(0), 400))
  fmax = np.asarray(limits['ffn_max'])
  assert np.all(a.ffn <= fmax[np.arange(3), a.block])  # within the limits
  assert np.any(a.ffn[:, 1] == 24) and not np.any(a.ffn[:, 0] > 16)  # the grown width is used
  assert np.all(np.isin(a.heads[a.block[:, 2] == 1, 2], [1, 3]))
  # Exported (one compile each): 10 random archs, the largest, the smallest.
  archs = arch_lib.stack(arch_lib.unstack(space.sample(jax.random.key(5), 10))
                         + [space.largest(), space.smallest()])
  assert int(archs.ffn[10, 1]) == 24  # the largest uses the grown width
  batch = {'tokens': jax.random.randint(jax.random.key(1), (2, 11), 0, 41)}
  graphdef, state = nnx.split(model)
  masked = jax.jit(jax.vmap(lambda s, x: nnx.merge(graphdef, s)(batch, x), in_axes=(None, 0)))
  logits = masked(state, archs)
  for i, arch in enumerate(arch_lib.unstack(archs)):
    dense = export.export(model, space.cfg, arch)
    ref = dense(batch)
    assert float(jnp.max(jnp.abs(logits[i] - ref)) / jnp.max(jnp.abs(ref))) <= 1e-5
    assert int(space.cost(arch)['params']) == export.param_count(dense)
  # The limits are the space: an arch beyond them is refused by name.
  bad = arch_lib.to_json(space.largest())
  bad['layers'][0]['ffn'] = 24
  with pytest.raises(UserError, match=r'layers\[0\]\.ffn=24.*up to 16'):
    arch_lib.from_json(bad, space.cfg)
  # Uniform sampling within limits covers exactly the allowed widths of a layer.
  widths = set(np.asarray(space.sample(jax.random.key(2), 400).ffn[:, 1]).tolist())
  assert widths == {4, 8, 12, 16, 20, 24}


def growth_space():
  cfg = ModelConfig(kind='encoder', vocab_size=41, max_len=16, norm_placement='post')
  return Space(cfg, space_config(dict(
      num_layers=2, hidden=[48], heads=[4], blocks=['transformer', 'bottleneck'],
      ffn=[12, 24, 36, 48, 60, 72], inner=[12], ffn_max=[[48, 48], [48, 48]])))


def test_growth_ranks_grows_top_blocks_and_respects_cap_and_budget():
  space = growth_space()
  pca = np.asarray([[30.0, 11.0], [20.0, 12.0]])
  ok = space.limits.heads_ok
  kw = dict(step=12, cap=72, heads_ok=ok, budget=0, mean_params=None)
  new, grown = growth.grow(space, [[48, 48], [48, 48]], pca, fraction=0.5, **kw)
  assert new == [[60, 48], [60, 48]]  # the two largest raw counts: both BERT blocks
  assert [(g['layer'], g['block'], g['from'], g['to']) for g in grown] == [
      (0, 'transformer', 48, 60), (1, 'transformer', 48, 60)]
  # 'share': 30/48, 11/12, 20/48, 12/12 -> the bottleneck FFNs are the most saturated.
  new, _ = growth.grow(space, [[48, 48], [48, 48]], pca, fraction=0.5, rank='share', **kw)
  assert new == [[48, 60], [48, 60]]
  # At the cap nothing grows; one below it grows to the cap.
  new, grown = growth.grow(space, [[72, 72], [72, 60]], pca, fraction=1.0, **kw)
  assert new == [[72, 72], [72, 72]] and len(grown) == 1
  # Budget: a stand-in mean (the sum of the limits) admits the first growth, not the second.
  kw.update(budget=48 * 4 + 12, mean_params=lambda lim: float(np.sum(lim.ffn_max)))
  new, grown = growth.grow(space, [[48, 48], [48, 48]], pca, fraction=0.5, **kw)
  assert new == [[60, 48], [48, 48]] and len(grown) == 1
  # The real estimate: growth raises the mean parameter count of sampled archs.
  mean = growth.make_mean_params(space, 64, 0)
  before = mean(space.make_limits([[48, 48], [48, 48]]))
  after = mean(space.make_limits([[72, 48], [72, 48]]))
  lo, hi = space.parameter_range()
  assert lo < before < after < hi


def test_sampler_follows_changing_limits_without_retracing():
  chex.clear_trace_counter()
  space = growth_space()
  sampler = Sampler(space, 'sandwich', num_random=6)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def draw(step, allowed):
    return sampler(jax.random.key(0), step, allowed)

  for ffn_max in ([[48, 48], [48, 48]], [[60, 48], [48, 60]], [[72, 72], [72, 72]]):
    allowed = sampler.allowed(space.make_limits(ffn_max))
    archs = jax.tree.map(np.asarray, [draw(s, allowed) for s in range(30)])
    ffn = np.stack([a.ffn for a in archs])  # [steps, K, L]
    block = np.stack([a.block for a in archs])
    assert ffn.shape == (30, 8, 2)
    limit = np.asarray(ffn_max)[np.arange(2), block]
    assert np.all(ffn <= limit)
    assert np.all(ffn[:, 0] == limit[:, 0])  # the largest is the largest allowed
    assert np.any(ffn[:, 2:] == limit[:, 2:])  # the random ones reach the limit


# -- training runs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_growth_never_retraces_nor_reshapes(data_cache, tmp_path, monkeypatch):
  traces = []
  make = trainer.make_train_step

  def counting(*args, **kwargs):
    step = make(*args, **kwargs)

    def traced(*a):
      traces.append(1)  # runs once per trace of the jitted step
      return step(*a)
    return traced

  monkeypatch.setattr(trainer, 'make_train_step', counting)
  cfg = elm_cfg(data_cache, growth_every=2, prune_every=4, cka_threshold=0.3)
  cfg.train.steps = 6
  workdir = tmp_path / 'w'
  trainer.train(cfg, workdir, progress=False)
  events = history(workdir)['events']
  assert sum(e['kind'] == 'growth' for e in events) >= 2, events
  assert any(e['kind'] == 'prune' for e in events), events
  assert len(traces) == 1
  # Arrays at the cap from the start: the checkpoint's shapes are the initialisation's.
  init = Model(build_space(cfg).model, build_space(cfg).cfg.supernet_dims(), rngs=nnx.Rngs(0))
  shapes = {'/'.join(map(str, p)): v[...].shape
            for p, v in nnx.to_flat_state(nnx.state(init, nnx.Param))}
  _, trained = params_of(workdir, cfg)
  assert {k: v.shape for k, v in trained.items()} == shapes
  assert max(build_space(cfg).cfg.ffn) == 72  # 1.5 x hidden 48
  # metrics.jsonl says what grew and when; search and export read the final space.
  lines = [json.loads(s) for s in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any(d.get('dynamic/grown') for d in lines)
  final = build_space(cfg, workdir).cfg
  assert final.ffn_max == tuple(tuple(r) for r in events[-1]['ffn_max'])
  assert max(max(r) for r in final.ffn_max) > 48


@pytest.mark.slow
def test_resume_after_a_growth_point_equals_uninterrupted_run(data_cache, tmp_path):
  cfg = elm_cfg(data_cache, growth_every=2, prune_every=4, cka_threshold=0.3)
  full = tmp_path / 'full'
  trainer.train(cfg, full, progress=False)
  part = tmp_path / 'part'
  cfg.train.steps = 5  # checkpoints at 3 and 5; the growth at 4 and pruning at 4 happened
  trainer.train(cfg, part, progress=False)
  shutil.rmtree(part / 'checkpoints' / '5')  # as if killed before step 5's checkpoint
  assert any(e['step'] == 4 for e in history(part)['events'])
  cfg.train.steps = 8
  trainer.train(cfg, part, progress=False)  # resumes from step 3: the history is cut there
  assert history(part) == history(full)
  step_a, a = params_of(full, cfg)
  step_b, b = params_of(part, cfg)
  assert step_a == step_b == 8
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize('field, value, match', [
    ('growth_cap', 0.5, r'growth_cap=0\.5 \(x hidden 48 = 24\) is below the current largest FFN '
                        r'width 48'),
    ('cka_threshold', 0.0, r'cka_threshold=0\.0 must lie in \(0, 1\]'),
    ('cka_threshold', 1.5, r'cka_threshold=1\.5 must lie in \(0, 1\]'),
    ('growth_every', -1, r'growth_every=-1 must be an integer >= 0'),
])
def test_bad_input_is_one_clear_line(data_cache, tmp_path, field, value, match):
  cfg = elm_cfg(data_cache, prune_every=2)
  cfg.train.dynamic[field] = value
  with pytest.raises(UserError, match=match) as e:
    trainer.train(cfg, tmp_path / 'w', progress=False)
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'w').exists()  # nothing half-written
  dynamic_config.check(elm_cfg(data_cache, cka_threshold=1.0))  # the closed end is allowed


def test_head_pruning_refuses_attention_kl_and_grouped_queries(data_cache):
  cfg = elm_cfg(data_cache, prune_every=2)
  cfg.train.distill.attn_kl = 1.0
  with pytest.raises(UserError, match='attn_kl.*prune_every'):
    dynamic_config.check(cfg)
  cfg = elm_cfg(data_cache, prune_every=2)
  cfg.space.kv_groups = (1, 2)
  with pytest.raises(UserError, match='multi-head attention'):
    build_space(cfg)
