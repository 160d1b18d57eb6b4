"""`losses.vocab_losses`: cross-entropy and logits KL of K students from pre-logit states, in
chunks of positions, against a NumPy hand computation (float64) and against itself unchunked.

Sizes are distinct primes (K=3 students, B=5 rows, T=11 positions, E=7, V=17) so a shape mix-up
cannot pass; chunk sizes 4 and 5 do not divide T (the last chunk is padded), 1 and 11 and 20 are
the edge cases; padding positions (weight 0) are everywhere.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import ad_checkpoint

from elastic_jax import losses

K, B, T, E, V = 3, 5, 11, 7, 17
TEMPERATURE = 1.7
CHUNKS = (0, 1, 4, 5, 11, 20)


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(7)
  weights = (rng.random((B, T)) < 0.6).astype(np.float32)
  weights[0] = 0.0  # a row of padding only
  weights[1, :3] = [2.0, 0.5, 1.0]  # weights need not be 0 / 1
  return {'x': rng.normal(size=(K, B, T, E)).astype(np.float32),
          'table': rng.normal(size=(E, V)).astype(np.float32),
          'bias': rng.normal(size=(V,)).astype(np.float32),
          't_x': rng.normal(size=(B, T, E)).astype(np.float32),
          't_table': rng.normal(size=(E, V)).astype(np.float32),
          'targets': rng.integers(0, V, (B, T)).astype(np.int32),
          'weights': weights}


def run(d, chunk, teacher, x=None, table=None, bias=None):
  """ce_K, kl_K of vocab_losses on `d` (float32), the projection x @ table + bias."""
  x = jnp.asarray(d['x'] if x is None else x)
  table = jnp.asarray(d['table'] if table is None else table)
  bias = jnp.asarray(d['bias'] if bias is None else bias)
  if teacher == 'external':
    t_table = jnp.asarray(d['t_table'])
    teacher = (jnp.asarray(d['t_x']), lambda h: h @ t_table)
  return losses.vocab_losses(x, lambda h: h @ table + bias, jnp.asarray(d['targets']),
                             jnp.asarray(d['weights']), teacher=teacher,
                             temperature=TEMPERATURE, chunk=chunk)


# -- NumPy hand computation ---------------------------------------------------------------------

def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


_HAND = {}


def hand(d, teacher):
  """(ce_K, kl_K) in float64, token by token."""
  if teacher not in _HAND:
    _HAND[teacher] = _hand(d, teacher)
  return _HAND[teacher]


def _hand(d, teacher):
  f64 = {k: v.astype(np.float64) for k, v in d.items() if k != 'targets'}
  z_K = f64['x'] @ f64['table'] + f64['bias']  # [K, B, T, V]
  w = f64['weights']
  ce = np.zeros(K)
  kl = np.zeros(K)
  if teacher == 'external':
    z_t = f64['t_x'] @ f64['t_table']
  elif teacher == 'first':
    z_t = z_K[0]
  for k in range(K):
    for b in range(B):
      for t in range(T):
        ce[k] -= w[b, t] * log_softmax(z_K[k, b, t])[d['targets'][b, t]]
        if teacher is not None and not (teacher == 'first' and k == 0):
          log_p = log_softmax(z_t[b, t] / TEMPERATURE)
          log_q = log_softmax(z_K[k, b, t] / TEMPERATURE)
          kl[k] += w[b, t] * np.sum(np.exp(log_p) * (log_p - log_q)) * TEMPERATURE ** 2
  return ce, kl


@pytest.mark.parametrize('teacher', [None, 'first', 'external'])
@pytest.mark.parametrize('chunk', CHUNKS)
def test_chunked_losses_equal_the_hand_computation(data, chunk, teacher):
  want_ce, want_kl = hand(data, teacher)
  ce, kl = run(data, chunk, teacher)
  np.testing.assert_allclose(np.asarray(ce), want_ce, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(kl), want_kl, rtol=1e-5, atol=1e-6)
  assert want_ce.min() > 1.0 and (teacher is None or want_kl[1:].min() > 1.0)  # not trivial


def test_the_existing_token_losses_agree(data):
  """vocab_losses is token_cross_entropy and logits_kl, per student, on whole logits."""
  z_K = data['x'] @ data['table'] + data['bias']
  z_t = data['t_x'] @ data['t_table']
  ce, kl = run(data, 4, 'external')
  for k in range(K):
    want_ce, _ = losses.token_cross_entropy(jnp.asarray(z_K[k]), data['targets'], data['weights'])
    want_kl = losses.logits_kl(jnp.asarray(z_K[k]), jnp.asarray(z_t), data['weights'],
                               TEMPERATURE)
    assert float(ce[k]) == pytest.approx(float(want_ce), rel=1e-5)
    assert float(kl[k]) == pytest.approx(float(want_kl), rel=1e-5)


@pytest.mark.parametrize('teacher', ['first', 'external'])
@pytest.mark.parametrize('chunk', [4, 5])
def test_gradients_equal_the_unchunked_ones(data, chunk, teacher):
  """With respect to the students' states and the projection; the teacher gets none."""
  def objective(chunk):
    def f(x, table, bias, t_x):
      d = dict(data, t_x=t_x)
      ce, kl = run(d, chunk, teacher, x, table, bias)
      return jnp.sum(ce * jnp.asarray([1.0, 0.6, 1.3])) + jnp.sum(kl * jnp.asarray([0.0, 1.1, 0.9]))
    return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

  args = [jnp.asarray(data[k]) for k in ('x', 'table', 'bias', 't_x')]
  got = objective(chunk)(*args)
  want = objective(0)(*args)
  for name, a, b in zip(('x', 'table', 'bias', 't_x'), got, want, strict=True):
    scale = float(jnp.max(jnp.abs(b)))
    assert scale > 0 or name == 't_x', name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * max(scale, 1.0),
                               err_msg=name)
  assert float(jnp.max(jnp.abs(got[3]))) == 0.0  # the external teacher: stop-gradient
  # In-place, the first student's logits are the teacher's: its KL term (weight 0 above) is 0,
  # and the others' KL reaches it only through its own cross-entropy, not through the teacher.
  if teacher == 'first':
    g_kl_only = jax.grad(lambda x: jnp.sum(run(data, chunk, 'first', x)[1]))(args[0])
    assert float(jnp.max(jnp.abs(g_kl_only[0]))) == 0.0
    assert float(jnp.max(jnp.abs(g_kl_only[1]))) > 0.0


@pytest.mark.parametrize('teacher', ['first', 'external'])
def test_teacher_log_probs_are_computed_once_per_chunk_for_all_students(
    data, teacher_log_probs_calls, teacher):
  """Counted when they run (a callback inside): once per chunk whatever the number of students
  (the forward pass; the backward pass, which recomputes chunks, adds a number that does not
  depend on the students either)."""
  count = teacher_log_probs_calls

  def counts(k, chunk):
    x = jnp.asarray(data['x'][:k])
    f = jax.jit(lambda x: jnp.sum(jnp.stack(run(data, chunk, teacher, x))))
    count[0] = 0
    jax.block_until_ready(f(x))
    forward = count[0]
    count[0] = 0
    jax.block_until_ready(jax.jit(jax.grad(f))(x))
    return forward, count[0]

  two = counts(2, 4)
  assert two[0] == 3  # 11 positions in chunks of 4
  assert counts(3, 4) == two


def test_backward_keeps_no_chunk_logits(data, capsys):
  """What the forward pass saves for the backward pass: chunked, no array with a vocabulary axis
  (each chunk's logits are recomputed); unchunked, [B, T, V] arrays (the check can fail)."""
  def saved_vocab_sized(chunk):
    def f(x, table):
      ce, kl = run(data, chunk, 'first', x, table)
      return jnp.sum(ce) + jnp.sum(kl)
    ad_checkpoint.print_saved_residuals(f, jnp.asarray(data['x']), jnp.asarray(data['table']))
    shapes = [tuple(int(s) for s in m.split(',') if s)
              for m in re.findall(r'\w+\[([\d,]*)\]', capsys.readouterr().out)]
    return sum(int(np.prod(s)) for s in shapes if len(s) >= 3 and s[-1] == V)  # logits-like

  assert saved_vocab_sized(4) == 0
  assert saved_vocab_sized(0) >= B * T * V


def test_negative_chunk_is_refused(data):
  with pytest.raises(ValueError, match='chunk=-1'):
    run(data, -1, None)
