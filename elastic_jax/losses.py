"""Token losses and distillation losses, shared by evaluation, training and the proxies.

Token losses return sums (and the weight total), never means, so callers can add them over
micro-batches, devices and processes before dividing: the mean is then over tokens, not batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def logits_kl(student_BTV, teacher_BTV, weights_BT, temperature: float):
  """Sum over weighted tokens of KL(teacher || student) at temperature T, times T^2 (Hinton)."""
  t = temperature
  log_p_t = jax.nn.log_softmax(teacher_BTV.astype(jnp.float32) / t, axis=-1)
  log_p_s = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / t, axis=-1)
  kl_BT = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return jnp.sum(kl_BT * weights_BT) * t * t


def channel_normalise(x_BTC, valid_BT, eps: float = 1e-6):
  """ELM: each feature channel to zero mean / unit std over the sequence, per example."""
  w = valid_BT[..., None].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
  x = x_BTC.astype(jnp.float32)
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
