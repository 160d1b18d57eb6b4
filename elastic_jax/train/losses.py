"""Token-level objectives shared by training, evaluation and search."""

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
