"""Distillation losses: logits KL, hidden-state MSE, attention KL, ELM's block-preserving loss.

The teacher is either the supernet's largest sub-network (in-place KD, stop-gradient) or an
external dense model. Student features come from the masked supernet, one entry per supernet layer
(zeros for layers that are off, which carry zero weight); each student layer i is matched to
teacher layer `layer_map[i]`. Where widths differ, a learned linear map (`Projections`) takes the
student feature to the teacher width; masked student channels are zeros, so the map acts on the
active prefix only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax.errors import UserError

FEATURE_LOSSES = ('hidden_mse', 'attn_kl', 'block_preserving')
# Features each loss reads (names of `Model(..., capture=...)`).
NEEDS = {'hidden_mse': ('hidden',), 'attn_kl': ('attn_probs',),
         'block_preserving': ('embed', 'attn_out', 'ffn_out')}


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


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
  """Student layer i learns from teacher layer round((i+1) * Lt / Ls) - 1 (TinyBERT's map)."""
  return tuple(max(round((i + 1) * teacher_layers / student_layers) - 1, 0)
               for i in range(student_layers))


def resolve_layer_map(configured, student_layers: int, teacher_layers: int) -> tuple[int, ...]:
  if not configured:
    return uniform_layer_map(student_layers, teacher_layers)
  layer_map = tuple(int(j) for j in configured)
  if len(layer_map) != student_layers or not all(0 <= j < teacher_layers for j in layer_map):
    raise UserError(f'config field train.distill.layer_map={list(layer_map)} must give, for each '
                    f'of the {student_layers} supernet layers, a teacher layer in '
                    f'[0, {teacher_layers})')
  return layer_map


class Projections(nnx.Module):
  """Learned student -> teacher width maps, one per student layer and feature (when widths
  differ); initialised to the identity on the shared prefix."""

  def __init__(self, features: dict[str, tuple[int, int, int]], *, rngs: nnx.Rngs):
    """`features`: name -> (number of maps, student width, teacher width)."""
    del rngs  # deterministic identity initialisation
    self.maps = nnx.Dict({
        name: nnx.Param(jnp.tile(jnp.eye(cs, ct)[None], (n, 1, 1)))
        for name, (n, cs, ct) in features.items() if cs != ct})

  def __call__(self, name: str, index: int, x_BTC):
    if name not in self.maps:
      return x_BTC
    return jnp.einsum('BTC,CD->BTD', x_BTC, self.maps[name][...][index])
