"""An exported model with a task head: class logits, or one score for regression (STS-B)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax.model.layers import make_param
from elastic_jax.model.supernet import Model


class Classifier(nnx.Module):
  """Pooled features -> dense -> `num_labels` outputs.

  Pooling: BERT's pooler output when the model has one (what `BertForSequenceClassification`
  reads), else the first token's last hidden state for encoders, and the last real token's for
  decoders (the only one that has seen the whole input).
  """

  def __init__(self, backbone: Model, num_labels: int, *, rngs: nnx.Rngs):
    self.backbone = backbone
    cfg = backbone.cfg
    self.kernel = make_param(rngs, (backbone.dims.hidden, num_labels), ('embed', 'labels'), cfg)
    self.bias = make_param(rngs, (num_labels,), ('labels',), cfg, 'zeros')

  def pooled(self, batch) -> jax.Array:
    model = self.backbone
    if model.pooler is not None:
      return model.hidden_states(batch, pooled=True)[1]
    x_BTD = model.hidden_states(batch)
    if model.cfg.kind == 'encoder':
      return x_BTD[:, 0]
    last_B = jnp.sum(batch['segment_ids'] > 0, axis=1) - 1
    return jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]

  def __call__(self, batch) -> jax.Array:
    """[B, num_labels] float32."""
    x_BD = self.pooled(batch).astype(jnp.float32)
    return x_BD @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
