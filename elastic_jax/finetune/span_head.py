"""An exported encoder with an extractive-QA head: start and end logits at every position."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax.model.layers import make_param
from elastic_jax.model.supernet import Model


class SpanHead(nnx.Module):
  """Last hidden states -> dense -> (start, end) logits, as `BertForQuestionAnswering`'s
  qa_outputs; padding positions get a large negative logit so no loss or answer lands there."""

  def __init__(self, backbone: Model, *, rngs: nnx.Rngs):
    self.backbone = backbone
    cfg = backbone.cfg
    self.kernel = make_param(rngs, (backbone.dims.hidden, 2), ('embed', 'labels'), cfg)
    self.bias = make_param(rngs, (2,), ('labels',), cfg, 'zeros')

  def __call__(self, batch) -> jax.Array:
    """[B, T, 2] float32: start logits [..., 0], end logits [..., 1]."""
    x_BTD = self.backbone.hidden_states(batch).astype(jnp.float32)
    logits_BT2 = x_BTD @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return jnp.where(batch['segment_ids'][..., None] > 0, logits_BT2, -1e9)
