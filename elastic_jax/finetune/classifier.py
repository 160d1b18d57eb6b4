"""An exported model with a task head: class logits, or one score for regression (STS-B); over one
encoded sequence (a cross-encoder) or, for sentence pairs, over each sentence encoded alone (a
siamese bi-encoder)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax.errors import UserError
from elastic_jax.model.layers import make_param
from elastic_jax.model.supernet import Model

POOLING = ('auto', 'pooler', 'cls', 'mean', 'last')
SEQUENCE_KEYS = ('tokens', 'segment_ids', 'positions', 'token_types')  # the backbone's inputs


def check_pooling(pooling: str, backbone: Model) -> None:
  """One clear error for a pooling the backbone cannot do (`finetune.pooling`)."""
  if pooling not in POOLING:
    raise UserError(f'finetune.pooling={pooling!r} is unknown; use one of {", ".join(POOLING)}')
  if pooling == 'pooler' and backbone.pooler is None:
    raise UserError("finetune.pooling='pooler' needs a model with BERT's pooler; this one has "
                    "none: use 'cls' or 'mean' (encoders), 'last' or 'mean' (decoders)")
  if pooling == 'cls' and backbone.cfg.kind != 'encoder':
    raise UserError("finetune.pooling='cls' reads the first token, which in a decoder has seen "
                    "only itself: use 'last' or 'mean'")


class Classifier(nnx.Module):
  """Pooled features -> dense -> `num_labels` outputs.

  Pooling (`finetune.pooling`): 'auto' is BERT's pooler output when the model has one (what
  `BertForSequenceClassification` reads), else the first token's last hidden state for encoders
  and the last real token's for decoders (the only one that has seen the whole input);
  'pooler', 'cls', 'last' choose one of those; 'mean' averages the last hidden states over the
  real tokens, the pooling sentence-transformers checkpoints (all-MiniLM-L6-v2 among them) were
  trained with: their [CLS] state and pooler never were.

  `siamese` (sentence pairs as [B, 2, T]: `finetune.pair_encoding='siamese'`): both sentences
  run through the backbone alone (one batch of 2B rows) and are pooled to u and v ('auto' is
  'mean' here, the sentence embedding sentence-transformers models are trained to give); the head
  reads (u, v, |u - v|) for classes (Reimers & Gurevych's SBERT classification objective) and
  cos(u, v) for a regression score (its similarity objective, with a fitted scale and offset).
  """

  def __init__(self, backbone: Model, num_labels: int, *, pooling: str = 'auto',
               siamese: bool = False, rngs: nnx.Rngs):
    check_pooling(pooling, backbone)
    self.backbone = backbone
    self.pooling = pooling
    self.siamese = siamese
    cfg = backbone.cfg
    features = backbone.dims.hidden
    if siamese:
      features = 1 if num_labels == 1 else 3 * features
    self.kernel = make_param(rngs, (features, num_labels), ('embed', 'labels'), cfg)
    self.bias = make_param(rngs, (num_labels,), ('labels',), cfg, 'zeros')

  def pooled(self, batch) -> jax.Array:
    """The features the head reads: [B, hidden], or a siamese pair's (see the class)."""
    if not self.siamese:
      return self._pool(batch, self.pooling)
    b = batch['tokens'].shape[0]
    rows = {k: batch[k].reshape((2 * b,) + batch[k].shape[2:]) for k in SEQUENCE_KEYS}
    pooled = self._pool(rows, 'mean' if self.pooling == 'auto' else self.pooling)
    u_BD, v_BD = jnp.moveaxis(pooled.astype(jnp.float32).reshape(b, 2, -1), 1, 0)
    if self.kernel.shape[0] == 1:
      cos_B = jnp.sum(u_BD * v_BD, -1) / jnp.maximum(
          jnp.linalg.norm(u_BD, axis=-1) * jnp.linalg.norm(v_BD, axis=-1), 1e-12)
      return cos_B[:, None]
    return jnp.concatenate([u_BD, v_BD, jnp.abs(u_BD - v_BD)], axis=-1)

  def _pool(self, batch, pooling: str) -> jax.Array:
    model = self.backbone
    if pooling == 'auto':
      pooling = ('pooler' if model.pooler is not None else
                 'cls' if model.cfg.kind == 'encoder' else 'last')
    if pooling == 'pooler':
      return model.hidden_states(batch, pooled=True)[1]
    x_BTD = model.hidden_states(batch)
    if pooling == 'cls':
      return x_BTD[:, 0]
    real_BT = batch['segment_ids'] > 0
    if pooling == 'mean':
      w_BT1 = real_BT[..., None].astype(jnp.float32)
      return jnp.sum(x_BTD.astype(jnp.float32) * w_BT1, axis=1) / jnp.maximum(
          jnp.sum(w_BT1, axis=1), 1.0)
    last_B = jnp.sum(real_BT, axis=1) - 1
    return jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]

  def __call__(self, batch) -> jax.Array:
    """[B, num_labels] float32."""
    x_BD = self.pooled(batch).astype(jnp.float32)
    return x_BD @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
