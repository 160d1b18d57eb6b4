"""Token losses and distillation losses, shared by evaluation, training and the proxies.

Token losses return sums (and the weight total), never means, so callers can add them over
micro-batches, devices and processes before dividing: the mean is then over tokens, not batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elastic_jax.accumulate import scan_map


def token_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                        weights_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted sum of per-token cross-entropy, and the weight total (sum / total = mean loss).

  Returning the two sums, not their ratio, lets callers add them over batches and devices before
  dividing, so the mean is over tokens, not over batches.
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  weights_BT = weights_BT.astype(jnp.float32)
  return jnp.sum((log_z_BT - target_logit_BT) * weights_BT), jnp.sum(weights_BT)


def token_accuracy(logits_BTV: jax.Array, targets_BT: jax.Array,
                   weights_BT: jax.Array) -> jax.Array:
  """Weighted count of tokens whose argmax prediction is the target (MLM accuracy)."""
  correct = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  return jnp.sum(correct * weights_BT.astype(jnp.float32))


def teacher_log_probs(teacher_BTV, temperature: float) -> jax.Array:
  """The teacher's log-probabilities at temperature T (float32), the target of `kl_to_teacher`."""
  return jax.nn.log_softmax(teacher_BTV.astype(jnp.float32) / temperature, axis=-1)


def kl_to_teacher(student_BTV, log_p_t_BTV, weights_BT, temperature: float):
  """Sum over weighted tokens of KL(teacher || student) at temperature T, times T^2 (Hinton),
  from the teacher's log-probabilities (`teacher_log_probs`): computed once, they serve every
  student."""
  t = temperature
  log_p_s = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / t, axis=-1)
  kl_BT = jnp.sum(jnp.exp(log_p_t_BTV) * (log_p_t_BTV - log_p_s), axis=-1)
  return jnp.sum(kl_BT * weights_BT) * t * t


def logits_kl(student_BTV, teacher_BTV, weights_BT, temperature: float):
  """Sum over weighted tokens of KL(teacher || student) at temperature T, times T^2 (Hinton)."""
  return kl_to_teacher(student_BTV, teacher_log_probs(teacher_BTV, temperature), weights_BT,
                       temperature)


def at_predictions(batch):
  """(take, targets, weights) of the positions whose tokens a batch predicts.

  A masked-LM batch with `mlm_positions` [B, P] (data.mlm_max_predictions: its rows' predicted
  positions, -1 after the last) predicts at most P of its T positions: `take(x)` gathers
  [B, T, ...] -> [B, P, ...] along axis 1, and targets and weights come at those positions
  (weight 0 at the padding). The vocabulary projection, cross-entropy and distillation then
  run on P positions per row instead of T, and give the same sums: every other position has
  weight 0. Without `mlm_positions`: the identity and the batch's own targets and weights."""
  pos_BP = batch.get('mlm_positions')
  if pos_BP is None:
    return (lambda x: x), batch['targets'], batch['weights']
  index_BP = jnp.maximum(pos_BP, 0)

  def take(x):
    index = index_BP.reshape(index_BP.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)

  valid_BP = (pos_BP >= 0).astype(batch['weights'].dtype)
  return take, take(batch['targets']), take(batch['weights']) * valid_BP


def vocab_losses(x_KBTE, project, targets_BT, weights_BT, *, teacher=None,
                 temperature: float = 1.0, chunk: int = 0, unroll: bool = False,
                 unroll_students: bool = False):
  """Cross-entropy and logits-KL sums of K students from their pre-logit states, never holding
  more than one chunk of positions' logits.

  `x_KBTE`: the K students' inputs of the vocabulary projection; `project` maps [..., E] to
  float32 logits [..., V] (the model's `project`). `teacher`: None (no KL), 'first' (student 0
  teaches the others: in-place distillation; its own KL is 0) or (x_BTE, project) of an external
  teacher. Per chunk of `chunk` positions (of every row, so a chunk spans the whole batch axis and
  its devices), the teacher's log-probabilities are computed once and read by every student, and
  the students run one at a time (in a `lax.scan`, or unrolled, as the step's sub-networks do).
  `chunk` = 0 (or >= T): one chunk, the whole [B, T, V] logits. The chunks run in a `lax.scan`
  under `jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of keeping
  them; `unroll` traces both scans (chunks, students) unrolled (for XLA's cost analysis, which
  counts a loop body once); `unroll_students` the students' alone (train.unroll_subnets).

  Returns (ce_K, kl_K): the weighted sums over tokens of each student's cross-entropy and of
  T^2 x KL(teacher || student) (zeros without a teacher), as `token_cross_entropy` and
  `logits_kl` give them.
  """
  if chunk < 0:
    raise ValueError(f'chunk={chunk} must be >= 0 (0: no chunking)')
  t_len = x_KBTE.shape[2]
  external = isinstance(teacher, tuple)
  t_x_BTE = teacher[0] if external else jnp.zeros(x_KBTE.shape[1:3] + (0,), x_KBTE.dtype)
  weights_BT = weights_BT.astype(jnp.float32)

  def chunk_sums(x_KBCE, t_x_BCE, targets_BC, weights_BC):
    ce = lambda z: token_cross_entropy(z, targets_BC, weights_BC)[0]
    z0 = project(x_KBCE[0])
    if teacher is None:
      log_p_t = None
    elif external:
      log_p_t = jax.lax.stop_gradient(teacher_log_probs(teacher[1](t_x_BCE), temperature))
    else:
      log_p_t = jax.lax.stop_gradient(teacher_log_probs(z0, temperature))
    kl = ((lambda z: jnp.zeros((), jnp.float32)) if log_p_t is None else
          (lambda z: kl_to_teacher(z, log_p_t, weights_BC, temperature)))
    kl0 = kl(z0) if external else jnp.zeros((), jnp.float32)

    def student(x_BCE):
      z = project(x_BCE)
      return ce(z), kl(z)

    ce_rest, kl_rest = scan_map(student, x_KBCE[1:], unroll or unroll_students)
    return (jnp.concatenate([ce(z0)[None], ce_rest]), jnp.concatenate([kl0[None], kl_rest]))

  if not chunk or chunk >= t_len:
    return chunk_sums(x_KBTE, t_x_BTE, targets_BT, weights_BT)
  n = -(-t_len // chunk)
  pad = n * chunk - t_len  # padded positions carry weight 0

  def split(a, axis):  # [..., T, ...] -> [n, ..., chunk, ...] along `axis` (the positions)
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    a = jnp.pad(a, widths)
    a = a.reshape(a.shape[:axis] + (n, chunk) + a.shape[axis + 1:])
    return jnp.moveaxis(a, axis, 0)

  xs = (split(x_KBTE, 2), split(t_x_BTE, 1), split(targets_BT, 1), split(weights_BT, 1))
  body = jax.checkpoint(lambda inputs: chunk_sums(*inputs), prevent_cse=False)

  def step(carry, inputs):
    ce, kl = body(inputs)
    return (carry[0] + ce, carry[1] + kl), None

  k = x_KBTE.shape[0]
  zeros = jnp.zeros((k,), jnp.float32)
  (ce_K, kl_K), _ = jax.lax.scan(step, (zeros, zeros), xs, unroll=unroll or 1)
  return ce_K, kl_K


def channel_normalise(x_BTC, valid_BT, eps: float = 1e-6):
  """ELM: each feature channel to zero mean / unit std over the sequence, per example; in
  float32, or float64 for a float64 model (dividing by a channel's std magnifies the rounding of
  its input: a float64 verification run keeps its precision)."""
  dtype = jnp.promote_types(x_BTC.dtype, jnp.float32)
  w = valid_BT[..., None].astype(dtype)
  n = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
  x = x_BTC.astype(dtype)
  mean = jnp.sum(x * w, axis=1, keepdims=True) / n
  var = jnp.sum(((x - mean) ** 2) * w, axis=1, keepdims=True) / n
  return (x - mean) * jax.lax.rsqrt(var + eps) * w


def block_preserving(student_BTC, teacher_BTC, valid_BT):
  """ELM's block-preserving loss: MSE of channel-normalised features (mean over valid tokens
  and channels)."""
  s = channel_normalise(student_BTC, valid_BT)
  t = channel_normalise(teacher_BTC, valid_BT)
  n = jnp.maximum(jnp.sum(valid_BT), 1.0) * teacher_BTC.shape[-1]
  return jnp.sum((s - t) ** 2) / n


def hidden_mse(student_BTC, teacher_BTC, valid_BT):
  w = valid_BT[..., None].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(valid_BT), 1.0) * teacher_BTC.shape[-1]
  return jnp.sum(((student_BTC - teacher_BTC) ** 2) * w) / n


def attention_kl(student_BNTS, teacher_BNTS, student_heads, teacher_heads, valid_BT):
  """KL between head-averaged attention distributions (TinyBERT's loss, made independent of head
  counts, which differ between sub-networks). Inactive student heads are zeros."""
  s = jnp.sum(student_BNTS, axis=1) / jnp.maximum(student_heads, 1)
  t = jnp.sum(teacher_BNTS, axis=1) / jnp.maximum(teacher_heads, 1)
  kl_BT = jnp.sum(t * (jnp.log(t + 1e-9) - jnp.log(s + 1e-9)), axis=-1)
  return jnp.sum(kl_BT * valid_BT) / jnp.maximum(jnp.sum(valid_BT), 1.0)
