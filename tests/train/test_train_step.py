"""The training step against independent references (float32).

- the sandwich step's gradient is the sum of the per-architecture gradients computed one by one
  (with and without in-place distillation, and with an external teacher);
- gradient accumulation and any split of the batch give the gradient and loss of the whole batch,
  every term a mean over the global batch's tokens, also when micro-batches hold different numbers
  of tokens;
- the teacher receives no gradient;
- the logits KL is KL(teacher || student) at temperature T, times T^2 (hand computation).

The step's gradient is read exactly from an optimizer whose state is the last gradient it saw.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import randomize
from flax import nnx

from elastic_jax import export
from elastic_jax import losses as loss_lib
from elastic_jax.train import distill
from elastic_jax.train.sampling import Sampler
from elastic_jax.train.step import DistillSpec, TrainState, make_loss_fn, make_train_step
from elastic_jax.train.trainer import _external_teacher_fn
from elastic_jax.workdir import build_space, init_supernet

VOCAB, B, T = 37, 6, 11
TEMPERATURE = 2.0
W_CE, W_KL = 0.7, 1.3


def grad_capture() -> optax.GradientTransformation:
  """An 'optimizer' that leaves the params alone and keeps the gradient as its state."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


@pytest.fixture(scope='module')
def setup():
  from conftest import load_config
  cfg = load_config('quickstart', 'tiny')
  cfg.model.vocab_size = VOCAB
  cfg.model.scan_layers = True  # the TPU configs' layer scan (the quickstart unrolls on CPU)
  space = build_space(cfg)
  model = randomize(init_supernet(cfg, space), seed=3, scale=0.2)
  graphdef, model_params = nnx.split(model, nnx.Param)
  proj_graphdef, proj_params = nnx.split(distill.Projections({}, rngs=nnx.Rngs(0)), nnx.Param)
  params = nnx.State({'model': model_params, 'proj': proj_params})
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
  targets = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
  # Rows keep very different numbers of tokens (1 to 11), as in masked LM or padded batches.
  keep = np.asarray([1, 11, 3, 9, 2, 7])
  weights = (np.arange(T)[None, :] < keep[:, None]).astype(np.float32)
  batch = {'tokens': jnp.asarray(tokens), 'targets': jnp.asarray(targets),
           'weights': jnp.asarray(weights)}
  return {'cfg': cfg, 'space': space, 'model': model, 'graphdef': graphdef,
          'proj_graphdef': proj_graphdef, 'params': params, 'batch': batch}


def spec_of(setup, *, ce=W_CE, kl=W_KL, in_place=True, teacher_heads=None, start_step=0,
            ramp_steps=0):
  space = setup['space']
  weights = {'ce': ce, 'logits_kl': kl, 'hidden_mse': 0.0, 'attn_kl': 0.0,
             'block_preserving': 0.0}
  heads = teacher_heads or tuple(int(h) for h in space.largest().heads)
  return DistillSpec(weights=weights, temperature=TEMPERATURE, in_place=in_place,
                     layer_map=tuple(range(space.num_layers)), teacher_heads=heads,
                     start_step=start_step, ramp_steps=ramp_steps)


def step_grads(setup, spec, grad_accum=1, batch=None, external=None, teacher_params=None,
               num_random=1, step=0, unroll_subnets=True):
  """(gradient, metrics, archs) of one sandwich step (one compile per setting, shared)."""
  sampler = Sampler(setup['space'], 'sandwich', num_random=num_random)
  key = (repr(spec), grad_accum, num_random, external is not None, unroll_subnets)
  compiled = setup.setdefault('steps', {})
  if key not in compiled:
    compiled[key] = jax.jit(make_train_step(setup['graphdef'], setup['proj_graphdef'], sampler,
                                            grad_capture(), spec, grad_accum, external,
                                            unroll_subnets=unroll_subnets))
  params = setup['params']
  rng = jax.random.key_data(jax.random.key(5))
  state = TrainState(step=jnp.int32(step), params=params,
                     opt_state=grad_capture().init(params), rng=rng)
  new, metrics = compiled[key](state, setup['batch'] if batch is None else batch, teacher_params)
  archs = sampler(jax.random.wrap_key_data(rng), jnp.int32(step))
  return new.opt_state, metrics, archs


# -- independent reference: each sub-network's loss written out, differentiated alone ---------

def hand_ce(logits, batch):
  """Mean over the batch's weighted tokens of -log softmax(logits)[target]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], axis=-1)[..., 0]
  return jnp.sum(nll * batch['weights']) / jnp.sum(batch['weights'])


def hand_kl(student, teacher, batch, t=TEMPERATURE):
  """T^2 x mean over weighted tokens of sum_v p_teacher (log p_teacher - log p_student)."""
  p_t = jax.nn.softmax(teacher / t, axis=-1)
  kl = jnp.sum(p_t * (jnp.log(p_t) - jax.nn.log_softmax(student / t, axis=-1)), axis=-1)
  return t * t * jnp.sum(kl * batch['weights']) / jnp.sum(batch['weights'])


def logits_of(setup, params, arch, batch):
  model = nnx.merge(setup['graphdef'], params['model'])
  return model({'tokens': batch['tokens']}, arch)


def per_arch_reference(setup, archs, batch, teacher_logits=None, *, in_place=True,
                       ce=W_CE, kl=W_KL, teacher_gets_gradient=False):
  """Sum over archs of jax.grad of each one's own loss, and the per-arch losses.

  In-place: arch 0 learns from the data alone; the others from ce x CE + kl x KL(teacher ||
  student), the teacher's logits a constant (computed beforehand, outside the differentiated
  function) unless `teacher_gets_gradient`. `teacher_logits` given: every arch is a student of
  that external teacher. No distillation: every arch learns from the data alone."""
  arch_key = str([np.asarray(x).tolist() for x in jax.tree.leaves(archs)])
  key = ((in_place, ce, kl, teacher_gets_gradient, arch_key)
         if teacher_logits is None and batch is setup['batch'] else None)
  cache = setup.setdefault('references', {})
  if key is not None and key in cache:
    return cache[key]
  out = _per_arch_reference(setup, archs, batch, teacher_logits, in_place, ce, kl,
                            teacher_gets_gradient)
  if key is not None:
    cache[key] = out
  return out


def _per_arch_reference(setup, archs, batch, teacher_logits, in_place, ce, kl,
                        teacher_gets_gradient):
  params = setup['params']
  k = archs.hidden.shape[0]
  arch = lambda i: jax.tree.map(lambda x: x[i], archs)
  const_teacher = teacher_logits
  if in_place and teacher_logits is None:
    const_teacher = jnp.asarray(np.asarray(logits_of(setup, params, arch(0), batch)))
  fns = reference_fns(setup)
  total, per_arch = None, []
  for i in range(k):
    if const_teacher is None or (in_place and teacher_logits is None and i == 0):
      value, g = fns['ce'](params, arch(i), batch)
    elif teacher_gets_gradient:
      value, g = fns['leaky'](params, arch(i), arch(0), batch, ce, kl)
    else:
      value, g = fns['kd'](params, arch(i), const_teacher, batch, ce, kl)
    per_arch.append(float(value))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return total, np.asarray(per_arch)


def reference_fns(setup):
  """Jitted value-and-grad of one sub-network's loss (the arch is an argument: one compile)."""
  if 'reference_fns' not in setup:
    def ce_loss(p, arch, batch):
      return hand_ce(logits_of(setup, p, arch, batch), batch)

    def kd_loss(p, arch, teacher, batch, ce, kl):
      logits = logits_of(setup, p, arch, batch)
      return ce * hand_ce(logits, batch) + kl * hand_kl(logits, teacher, batch)

    def leaky_loss(p, arch, teacher_arch, batch, ce, kl):
      return kd_loss(p, arch, logits_of(setup, p, teacher_arch, batch), batch, ce, kl)

    setup['reference_fns'] = {name: jax.jit(jax.value_and_grad(f)) for name, f in
                              (('ce', ce_loss), ('kd', kd_loss), ('leaky', leaky_loss))}
  return setup['reference_fns']


def assert_trees_close(got, want, rtol=1e-5):
  """Every leaf within rtol x (the largest magnitude of the whole reference gradient)."""
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
  assert scale > 0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=rtol * scale)


def max_tree_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                              jax.tree.leaves(b)))


# -- the tests ------------------------------------------------------------------------------

@pytest.mark.slow  # one more compile of the step (~15 s on 2 cores)
def test_sandwich_gradient_is_the_sum_of_per_arch_gradients_without_distillation(setup):
  spec = spec_of(setup, in_place=False)
  grads, metrics, archs = step_grads(setup, spec)
  want, per_arch = per_arch_reference(setup, archs, setup['batch'], in_place=False)
  assert archs.hidden.shape[0] == 3  # largest, smallest, one random
  assert_trees_close(grads, want)
  np.testing.assert_allclose(np.asarray(metrics['loss_per_arch']), per_arch, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(metrics['ce_per_arch']), per_arch, rtol=1e-5)
  assert float(metrics['loss']) == pytest.approx(per_arch.sum(), rel=1e-5)


def test_distillation_starts_at_start_step_and_ramps_in_linearly(setup):
  # Start at step 4, ramp over 2 steps: the students' logits KL has weight 0 at steps 0 and 3,
  # half at step 4 (the first of the ramp), all of it from step 5 on; CE keeps its weight.
  spec = spec_of(setup, in_place=True, start_step=4, ramp_steps=2)
  for step, kl in ((0, 0.0), (3, 0.0), (4, W_KL / 2), (5, W_KL), (40, W_KL)):
    grads, metrics, archs = step_grads(setup, spec, step=step)
    want, per_arch = per_arch_reference(setup, archs, setup['batch'], kl=kl)
    assert_trees_close(grads, want)
    np.testing.assert_allclose(np.asarray(metrics['loss_per_arch']), per_arch, rtol=1e-5)


# Unrolled (train.unroll_subnets, the default) and looped sub-networks (`lax.scan`) alike.
@pytest.mark.parametrize('unroll_subnets', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_sandwich_gradient_with_in_place_distillation_and_no_gradient_to_the_teacher(
    setup, unroll_subnets):
  spec = spec_of(setup, in_place=True)
  grads, metrics, archs = step_grads(setup, spec, num_random=2, unroll_subnets=unroll_subnets)
  assert archs.hidden.shape[0] == 4  # largest, smallest, two random: three students
  want, per_arch = per_arch_reference(setup, archs, setup['batch'])
  assert_trees_close(grads, want)
  np.testing.assert_allclose(np.asarray(metrics['loss_per_arch']), per_arch, rtol=1e-5)
  assert float(metrics['loss']) == pytest.approx(per_arch.sum(), rel=1e-5)
  # The check can fail: had the teacher's logits carried a gradient, the step's would differ.
  leaky, _ = per_arch_reference(setup, archs, setup['batch'], teacher_gets_gradient=True)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
  assert max_tree_diff(leaky, want) > 1e-3 * scale


def external_teacher(setup):
  space = setup['space']
  teacher = export.export(randomize(init_supernet(setup['cfg'], space), 11, 0.2), space.cfg,
                          space.largest())
  t_graphdef, t_params = nnx.split(teacher, nnx.Param)
  return teacher, t_graphdef, t_params


@pytest.mark.slow  # one more compile of the step (~15 s on 2 cores)
def test_external_teacher_gets_no_gradient_and_the_step_matches_the_reference(setup):
  teacher, t_graphdef, t_params = external_teacher(setup)
  spec = spec_of(setup, in_place=False,
                 teacher_heads=tuple(l.heads for l in teacher.dims.layers))
  run_teacher = _external_teacher_fn(t_graphdef)
  grads, metrics, archs = step_grads(setup, spec, external=run_teacher, teacher_params=t_params)
  teacher_logits = jnp.asarray(np.asarray(teacher({'tokens': setup['batch']['tokens']})))
  want, per_arch = per_arch_reference(setup, archs, setup['batch'], teacher_logits,
                                      in_place=False)
  assert_trees_close(grads, want)
  np.testing.assert_allclose(np.asarray(metrics['loss_per_arch']), per_arch, rtol=1e-5)

  # The loss's gradient with respect to the teacher's parameters is exactly zero ...
  loss_fn = make_loss_fn(setup['graphdef'], setup['proj_graphdef'], spec, run_teacher)
  from elastic_jax.train.step import token_totals
  totals = token_totals(setup['batch'])
  g_teacher = jax.grad(lambda tp: loss_fn(setup['params'], setup['batch'], archs, tp, totals)[0])(
      t_params)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g_teacher))
  # ... and would not be without the stop-gradient (the check can fail).
  def leaky(tp):
    model = nnx.merge(setup['graphdef'], setup['params']['model'])
    logits = model({'tokens': setup['batch']['tokens']}, jax.tree.map(lambda x: x[1], archs))
    t_logits = nnx.merge(t_graphdef, tp)({'tokens': setup['batch']['tokens']})
    return hand_kl(logits, t_logits, setup['batch'])
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(jax.grad(leaky)(t_params))) > 0


def test_grad_accum_equals_one_step_on_the_whole_batch_token_weighted(setup):
  grad_accum = 3
  spec = spec_of(setup, in_place=True)
  whole, m_whole, archs = step_grads(setup, spec, grad_accum=1)
  split, m_split, _ = step_grads(setup, spec, grad_accum=grad_accum)
  assert_trees_close(split, whole)
  assert float(m_split['loss']) == pytest.approx(float(m_whole['loss']), rel=1e-5)
  np.testing.assert_allclose(np.asarray(m_split['loss_per_arch']),
                             np.asarray(m_whole['loss_per_arch']), rtol=1e-5)
  # Both equal the reference on the whole batch (token-weighted) ...
  want, per_arch = per_arch_reference(setup, archs, setup['batch'])
  assert_trees_close(split, want)
  assert float(m_split['loss']) == pytest.approx(per_arch.sum(), rel=1e-5)
  # ... which a mean of micro-batch means is not: the micro-batches' token counts differ.
  w = np.asarray(setup['batch']['weights'])
  counts = [w[i::grad_accum].sum() for i in range(grad_accum)]
  assert len(set(counts)) > 1


def test_reordering_the_rows_of_a_batch_changes_neither_loss_nor_gradient(setup):
  """Another split of the same tokens: the rows permuted, so micro-batches group other rows."""
  spec = spec_of(setup, in_place=True)
  whole, m_whole, _ = step_grads(setup, spec, grad_accum=3)
  perm = np.asarray([1, 0, 4, 3, 2, 5])  # micro-batches {1, 3}, {0, 2}, {4, 5}
  batch = {k: v[perm] for k, v in setup['batch'].items()}
  shuffled, m_shuffled, _ = step_grads(setup, spec, grad_accum=3, batch=batch)
  assert_trees_close(shuffled, whole)
  assert float(m_shuffled['loss']) == pytest.approx(float(m_whole['loss']), rel=1e-5)


def test_logits_kl_is_teacher_to_student_with_temperature_squared():
  rng = np.random.default_rng(4)
  student = rng.normal(size=(2, 3, 5)) * 2.0
  teacher = rng.normal(size=(2, 3, 5)) * 2.0
  w = np.asarray([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
  t = 3.0

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  def kl(p, q):  # KL(p || q) per token
    return (p * (np.log(p) - np.log(q))).sum(-1)

  p_t, p_s = softmax(teacher / t), softmax(student / t)
  expected = t * t * (kl(p_t, p_s) * w).sum()
  got = float(loss_lib.logits_kl(jnp.asarray(student, jnp.float32),
                                 jnp.asarray(teacher, jnp.float32), jnp.asarray(w), t))
  assert got == pytest.approx(expected, rel=1e-5)
  # The test tells the alternatives apart: the other direction, no T^2, no temperature.
  wrong = {'KL(student || teacher)': t * t * (kl(p_s, p_t) * w).sum(),
           'without T^2': (kl(p_t, p_s) * w).sum(),
           'T = 1': (kl(softmax(teacher), softmax(student)) * w).sum()}
  for name, value in wrong.items():
    assert abs(value - expected) > 0.05 * expected, name


# -- vocabulary losses in chunks of positions (train.logits_chunk) -------------------------------

CHUNK = 4  # T = 11 positions: chunks of 4, 4 and 3 (one padded position)


def sgd_capture(lr: float = 0.1) -> optax.GradientTransformation:
  """Plain SGD whose state is the last gradient: one step gives the updated params and the
  gradient it followed."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(lambda g: -lr * g, grads), grads))


def sgd_step(setup, spec, logits_chunk, num_random=1, external=None, teacher_params=None,
             unroll_subnets=True, batch=None):
  """(new state, metrics, archs) of one sandwich step with SGD (compiled here, not cached)."""
  sampler = Sampler(setup['space'], 'sandwich', num_random=num_random)
  step = jax.jit(make_train_step(setup['graphdef'], setup['proj_graphdef'], sampler,
                                 sgd_capture(), spec, 1, external, logits_chunk=logits_chunk,
                                 unroll_subnets=unroll_subnets))
  params = setup['params']
  rng = jax.random.key_data(jax.random.key(5))
  state = TrainState(step=jnp.int32(0), params=params, opt_state=sgd_capture().init(params),
                     rng=rng)
  new, metrics = step(state, setup['batch'] if batch is None else batch, teacher_params)
  return new, metrics, sampler(jax.random.wrap_key_data(rng), jnp.int32(0))


@pytest.mark.parametrize('unroll_subnets', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_chunked_vocabulary_losses_change_neither_the_losses_nor_the_step(setup, unroll_subnets):
  spec = spec_of(setup, in_place=True)
  off, m_off, archs = sgd_step(setup, spec, 0, unroll_subnets=unroll_subnets)
  on, m_on, _ = sgd_step(setup, spec, CHUNK, unroll_subnets=unroll_subnets)
  for name in ('loss_per_arch', 'ce_per_arch'):
    np.testing.assert_allclose(np.asarray(m_on[name]), np.asarray(m_off[name]), rtol=1e-5)
  assert_trees_close(on.opt_state, off.opt_state)  # the gradients
  assert_trees_close(on.params, off.params)
  # Both are the independent reference: each sub-network's loss written out on whole logits.
  want, per_arch = per_arch_reference(setup, archs, setup['batch'])
  assert_trees_close(on.opt_state, want)
  np.testing.assert_allclose(np.asarray(m_on['loss_per_arch']), per_arch, rtol=1e-5)
  # The updated parameters moved (the comparison above could fail).
  assert max_tree_diff(on.params, setup['params']) > 1e-4


@pytest.mark.slow  # two more compiles of the step (~30 s on 2 cores)
def test_chunked_step_with_an_external_teacher_matches_the_reference(setup):
  teacher, t_graphdef, t_params = external_teacher(setup)
  spec = spec_of(setup, in_place=False,
                 teacher_heads=tuple(l.heads for l in teacher.dims.layers))
  run_teacher = _external_teacher_fn(t_graphdef)
  on, m_on, archs = sgd_step(setup, spec, CHUNK, external=run_teacher, teacher_params=t_params)
  teacher_logits = jnp.asarray(np.asarray(teacher({'tokens': setup['batch']['tokens']})))
  want, per_arch = per_arch_reference(setup, archs, setup['batch'], teacher_logits,
                                      in_place=False)
  assert_trees_close(on.opt_state, want)
  np.testing.assert_allclose(np.asarray(m_on['loss_per_arch']), per_arch, rtol=1e-5)


@pytest.mark.slow  # two more compiles of the step (~30 s on 2 cores)
def test_the_teachers_log_probabilities_are_computed_once_per_step_for_every_student(
    setup, teacher_log_probs_calls):
  """Counted as they run (a callback inside `losses.teacher_log_probs`): with 3 and with 4
  sub-networks per step, the same number of times, once per chunk in the forward pass (the
  backward pass, which recomputes chunks, adds a number that does not depend on K either)."""
  count = teacher_log_probs_calls
  spec = spec_of(setup, in_place=True)
  counts = []
  for num_random in (1, 2):
    count[0] = 0
    _, metrics, _ = sgd_step(setup, spec, CHUNK, num_random=num_random)
    jax.block_until_ready(metrics)
    assert metrics['loss_per_arch'].shape == (2 + num_random,)
    counts.append(count[0])
  assert counts[0] == counts[1]
  assert 3 <= counts[0] < 2 * 3  # 3 chunks: once each, plus part of the backward's recompute


def test_the_sub_networks_share_one_token_lookup(setup):
  """The K sub-networks of a step read their token vectors from one lookup of the supernet's
  table (each its hidden prefix), so the backward pass scatters into the table once: counted in
  the step's jaxpr, with 3 and with 4 sub-networks (the losses stay the per-arch reference's:
  the tests above)."""
  def table_ops(num_random):
    sampler = Sampler(setup['space'], 'sandwich', num_random=num_random)
    step = make_train_step(setup['graphdef'], setup['proj_graphdef'], sampler, grad_capture(),
                           spec_of(setup), 1)
    params = setup['params']
    state = TrainState(step=jnp.int32(0), params=params, opt_state=grad_capture().init(params),
                       rng=jax.random.key_data(jax.random.key(5)))
    counts = {'gather': 0, 'scatter-add': 0}

    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        if eqn.primitive.name in counts and eqn.invars[0].aval.shape[0] == VOCAB:
          counts[eqn.primitive.name] += 1
        for sub in jax.core.jaxprs_in_params(eqn.params):
          walk(sub)

    walk(jax.make_jaxpr(step)(state, setup['batch'], None).jaxpr)
    return counts

  assert table_ops(1) == table_ops(2) == {'gather': 1, 'scatter-add': 1}


# -- a masked-LM batch that names its predicted positions (data.mlm_max_predictions) -----------

def predicted_batch(setup, cap=4):
  """The setup's tokens with masked-LM-like weights: 0 to `cap` random positions per row (a row
  with none too), named in `mlm_positions` [B, cap] in order, then -1."""
  rng = np.random.default_rng(7)
  weights = np.zeros((B, T), np.float32)
  positions = np.full((B, cap), -1, np.int32)
  for row, count in enumerate([4, 0, 1, 3, 4, 2]):
    chosen = np.sort(rng.choice(T, count, replace=False))
    weights[row, chosen] = 1.0
    positions[row, :count] = chosen
  full = {**setup['batch'], 'weights': jnp.asarray(weights)}
  return full, {**full, 'mlm_positions': jnp.asarray(positions)}


@pytest.mark.parametrize('logits_chunk', [0, pytest.param(CHUNK, marks=pytest.mark.slow)])
def test_predicted_positions_change_neither_the_losses_nor_the_step(setup, logits_chunk):
  """The vocabulary read at the named positions only: the same losses and gradient as the
  independent reference on whole logits (every other position has weight 0)."""
  full, named = predicted_batch(setup)
  spec = spec_of(setup, in_place=True)
  on, m_on, archs = sgd_step(setup, spec, logits_chunk, num_random=2, batch=named)
  want, per_arch = per_arch_reference(setup, archs, full)
  assert_trees_close(on.opt_state, want)
  np.testing.assert_allclose(np.asarray(m_on['loss_per_arch']), per_arch, rtol=1e-5)
  # The positions are read: naming other positions gives another step.
  shifted = {**named, 'mlm_positions': jnp.where(named['mlm_positions'] >= 0,
                                                 (named['mlm_positions'] + 1) % T, -1)}
  other, _, _ = sgd_step(setup, spec, logits_chunk, num_random=2, batch=shifted)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
  assert max_tree_diff(other.opt_state, want) > 1e-3 * scale


@pytest.mark.slow  # one more compile of the step (~15 s on 2 cores)
def test_predicted_positions_with_an_external_teacher_match_the_reference(setup):
  full, named = predicted_batch(setup)
  teacher, t_graphdef, t_params = external_teacher(setup)
  spec = spec_of(setup, in_place=False,
                 teacher_heads=tuple(l.heads for l in teacher.dims.layers))
  on, m_on, archs = sgd_step(setup, spec, 0, external=_external_teacher_fn(t_graphdef),
                             teacher_params=t_params, batch=named)
  teacher_logits = jnp.asarray(np.asarray(teacher({'tokens': full['tokens']})))
  want, per_arch = per_arch_reference(setup, archs, full, teacher_logits, in_place=False)
  assert_trees_close(on.opt_state, want)
  np.testing.assert_allclose(np.asarray(m_on['loss_per_arch']), per_arch, rtol=1e-5)


def test_predicted_positions_in_evaluation_and_the_dense_step(setup):
  """`evaluation.batch_sums` and the dense reference step (`make_dense_step`) read the named
  positions only and give the whole logits' sums and gradient."""
  from elastic_jax.evaluation import batch_sums
  from elastic_jax.train.step import make_dense_step
  full, named = predicted_batch(setup)
  space = setup['space']
  arch = space.smallest()
  model = nnx.merge(setup['graphdef'], setup['params']['model'])
  logits = model({'tokens': full['tokens']}, arch)
  want = [hand_ce(logits, full) * jnp.sum(full['weights']), jnp.sum(full['weights']),
          jnp.sum((jnp.argmax(logits, -1) == full['targets']) * full['weights'])]
  got = jax.jit(batch_sums)(model, named, arch)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)

  dense = export.export(model, space.cfg, arch)
  d_graphdef, d_params = nnx.split(dense, nnx.Param)
  params = nnx.State({'model': d_params})
  step = jax.jit(make_dense_step(d_graphdef, grad_capture(), 1))
  state = TrainState(step=jnp.int32(0), params=params, opt_state=grad_capture().init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  new, metrics = step(state, named)
  ref = jax.value_and_grad(lambda p: hand_ce(nnx.merge(d_graphdef, p['model'])(
      {'tokens': full['tokens']}), full))(params)
  assert float(metrics['loss']) == pytest.approx(float(ref[0]), rel=1e-5)
  assert_trees_close(new.opt_state, ref[1])
