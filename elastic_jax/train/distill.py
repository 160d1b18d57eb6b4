"""Distillation in training: which features each loss reads, the layer map, the projections.

The losses themselves (logits KL, hidden-state MSE, attention KL, ELM's block-preserving loss)
are in `elastic_jax/losses.py`.

The teacher is either the supernet's largest sub-network (in-place KD, stop-gradient) or an
external dense model. Student features come from the masked supernet, one entry per supernet layer
(zeros for layers that are off, which carry zero weight); each student layer i is matched to
teacher layer `layer_map[i]`. Where widths differ, a learned linear map (`Projections`) takes the
student feature to the teacher width; masked student channels are zeros, so the map acts on the
active prefix only.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from elastic_jax.errors import UserError

FEATURE_LOSSES = ('hidden_mse', 'attn_kl', 'block_preserving')
# Features each loss reads (names of `Model(..., capture=...)`).
NEEDS = {'hidden_mse': ('hidden',), 'attn_kl': ('attn_probs',),
         'block_preserving': ('embed', 'attn_out', 'ffn_out')}


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
