"""Block types a layer can take, and their analytic costs, in one registry.

A block maps the hidden stream [B, T, hidden] to itself. Each block class has:
- `__init__(cfg, dims, layer, rngs)`: weights at the layer's (maximum) sizes;
- `__call__(x, ctx, active)`: `active` is None for a dense model, else traced active sizes;
- `cost(cfg, s)`: parameters, matmul FLOPs per token, attention width, stored activations per token
  and KV-cache entries per token, from the active sizes `s` alone (ints or traced int32 scalars),
  so the cost model is jittable and equals the exported model's real parameter count;
- `averages_tokens`: True when the block mixes tokens only by attention (convex combinations of
  value vectors), so that equal input tokens give equal output tokens whatever the mask and
  positions (SynFlow then runs on one token, see `equal_tokens_stay_equal`).

A new operation (FlexiBERT's convolution block, stacked FFNs, ...) is a new class registered here;
nothing else changes. The 'skip' type has no class: it is the identity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax.config import LayerDims, ModelConfig, ModelDims
from elastic_jax.model.flexibert import FLEXIBERT_BLOCK_CLASSES
from elastic_jax.model.layers import (
    MLP,
    Attention,
    Norm,
    linear_params,
    make_param,
    norm_params,
    prefix_mask,
)

Array = jax.Array

# Features a block can hand to distillation losses, zero-cost proxies and importance scores:
# attention probabilities, the FFN's input, first-linear kernel (masked to the active width) and
# pre-activation, and the attention and FFN outputs; the attention's input, per-head context
# [B,T,N,H] (before the output projection), the FFN's activation (the down projection's input) and
# each head's output [B,T,N,width] (its context through its slice of the output projection).
BLOCK_CAPTURES = ('attn_probs', 'ffn_in', 'ffn_kernel', 'ffn_pre', 'attn_out', 'ffn_out',
                  'attn_in', 'attn_heads', 'ffn_act', 'attn_head_out')
# Captures that are (masked) weights, not activations: they have no batch axis.
PARAMETER_CAPTURES = ('ffn_kernel',)
# The axis of each block feature that has the block's width (hidden, or a bottleneck's inner
# width); the masked supernet zero-pads it to the layer's widest block.
WIDTH_AXIS = {'attn_out': -1, 'ffn_out': -1, 'ffn_in': -1, 'ffn_kernel': 0, 'attn_in': -1,
              'attn_head_out': -1}


@dataclasses.dataclass(frozen=True)
class Context:
  """What every block of one forward pass shares."""

  attn_mask_BTS: Array  # may query position t attend to key position s
  positions_BT: Array
  hidden_mask: Array | None  # [hidden] active features; None in a dense model
  hidden_count: Array | int  # number of active hidden features
  capture: tuple[str, ...] = ()
  # The segment ids the mask was made from (same segment, and causal in a decoder), or None when
  # the mask came from elsewhere: what a fused attention kernel reads instead of the mask.
  segments_BT: Array | None = None


def attention_cost(cfg: ModelConfig, width, heads, kv_groups, head_dim):
  qkv_bias = 1 if cfg.attn_qkv_bias else 0
  q = width * heads * head_dim + qkv_bias * heads * head_dim
  kv = 2 * (width * kv_groups * head_dim + qkv_bias * kv_groups * head_dim)
  o = linear_params(cfg, heads * head_dim, width)
  matmul = width * heads * head_dim * 2 + 2 * width * kv_groups * head_dim
  return q + kv + o, matmul


def mlp_cost(cfg: ModelConfig, width, ffn):
  n_in = 2 if cfg.mlp == 'swiglu' else 1
  params = n_in * linear_params(cfg, width, ffn) + linear_params(cfg, ffn, width)
  return params, (n_in + 1) * width * ffn


class _Captures:
  """Collects the requested features of one block call (a dict with the names asked for)."""

  def __init__(self, names):
    self.store = {'names': names}

  def want(self, name):
    return name in self.store['names']

  def put(self, name, value):
    if self.want(name):
      self.store[name] = value

  def result(self):
    return {k: v for k, v in self.store.items() if k != 'names'}


class TransformerBlock(nnx.Module):
  """BERT / GPT-2 / Llama block: attention then FFN, both on the hidden stream."""

  averages_tokens = True

  def __init__(self, cfg: ModelConfig, dims: ModelDims, layer: LayerDims, *, rngs: nnx.Rngs):
    self.pre_norm = cfg.norm_placement == 'pre'
    self.norm1 = Norm(dims.hidden, 'embed', cfg, rngs=rngs)
    self.attn = Attention(dims.hidden, 'embed', layer.heads, layer.kv_groups, dims.head_dim, cfg,
                          rngs=rngs, segments=layer.head_segments, kv_ratio=layer.kv_ratio)
    self.norm2 = Norm(dims.hidden, 'embed', cfg, rngs=rngs)
    self.mlp = MLP(dims.hidden, 'embed', layer.ffn, cfg, rngs=rngs, segments=layer.ffn_segments)

  def __call__(self, x: Array, ctx: Context, active: dict | None):
    cap = _Captures(ctx.capture)
    m, n = ctx.hidden_mask, ctx.hidden_count
    mask = (lambda v: v) if m is None else (lambda v: v * m)
    attn_active = None if active is None else {'heads': active['heads'],
                                               'kv_groups': active['kv_groups'],
                                               'head_dim': active['head_dim']}
    ffn_active = None if active is None else active['ffn']
    ffn_skip = None if active is None else active.get('ffn_skip')
    if self.pre_norm:
      a = mask(self.attn(self.norm1(x, m, n), ctx.attn_mask_BTS, ctx.positions_BT, attn_active,
                         cap.store, ctx.segments_BT))
      x = x + a
      f = mask(self.mlp(self.norm2(x, m, n), ffn_active, cap.store, ffn_skip))
      x = x + f
    else:
      a = mask(self.attn(x, ctx.attn_mask_BTS, ctx.positions_BT, attn_active, cap.store,
                         ctx.segments_BT))
      x = self.norm1(x + a, m, n)
      f = mask(self.mlp(x, ffn_active, cap.store, ffn_skip))
      x = self.norm2(x + f, m, n)
    cap.put('attn_out', a)
    cap.put('ffn_out', f)
    return x, cap.result()

  @staticmethod
  def cost(cfg: ModelConfig, s: dict) -> dict:
    h = s['hidden']
    attn_p, attn_mm = attention_cost(cfg, h, s['heads'], s['kv_groups'], s['head_dim'])
    mlp_p, mlp_mm = mlp_cost(cfg, h, s['ffn'])
    return {
        'params': 2 * norm_params(cfg, h) + attn_p + mlp_p,
        'matmul_macs': attn_mm + mlp_mm,
        'attn_width': s['heads'] * s['head_dim'],
        'kv_entries': 2 * s['kv_groups'] * s['head_dim'],
        # Stored for the backward pass, per token: block input, 2 norm outputs, q/k/v, attention
        # output, FFN pre-activation and activation (x2 for SwiGLU), residual.
        'act_entries': 5 * h + (s['heads'] + 2 * s['kv_groups']) * s['head_dim']
                       + s['heads'] * s['head_dim'] + (4 if cfg.mlp == 'swiglu' else 2) * s['ffn'],
        'heads': s['heads'],
    }


class BottleneckBlock(nnx.Module):
  """MobileBERT-style block: project hidden -> inner, attention and FFN in the inner width, back.

  Pre-norm:  z = in(norm_in(x)); z += attn(norm_a(z)); z += ffn(norm_f(z)); x += out(z).
  Post-norm: z = in(x); z = norm_a(z + attn(z)); z = norm_f(z + ffn(z)); x = norm_out(x + out(z)).
  """

  averages_tokens = True

  def __init__(self, cfg: ModelConfig, dims: ModelDims, layer: LayerDims, *, rngs: nnx.Rngs):
    self.pre_norm = cfg.norm_placement == 'pre'
    self.inner = layer.inner
    self.norm_io = Norm(dims.hidden, 'embed', cfg, rngs=rngs)  # norm_in (pre) / norm_out (post)
    self.proj_in = make_param(rngs, (dims.hidden, layer.inner), ('embed', 'inner'), cfg)
    self.proj_out = make_param(rngs, (layer.inner, dims.hidden), ('inner', 'embed'), cfg)
    if cfg.use_bias:
      self.proj_in_bias = make_param(rngs, (layer.inner,), ('inner',), cfg, 'zeros')
      self.proj_out_bias = make_param(rngs, (dims.hidden,), ('embed',), cfg, 'zeros')
    else:
      self.proj_in_bias = self.proj_out_bias = None
    self.norm_a = Norm(layer.inner, 'inner', cfg, rngs=rngs)
    self.attn = Attention(layer.inner, 'inner', layer.heads, layer.kv_groups,
                          dims.bottleneck_head_dim, cfg, rngs=rngs,
                          segments=layer.head_segments, kv_ratio=layer.kv_ratio)
    self.norm_f = Norm(layer.inner, 'inner', cfg, rngs=rngs)
    self.mlp = MLP(layer.inner, 'inner', layer.ffn, cfg, rngs=rngs,
                   segments=layer.ffn_segments)

  def __call__(self, x: Array, ctx: Context, active: dict | None):
    cap = _Captures(ctx.capture)
    m, n = ctx.hidden_mask, ctx.hidden_count
    ffn_skip = None if active is None else active.get('ffn_skip')
    if active is None:
      im, i_n, attn_active, ffn_active = None, None, None, None
    else:
      im = prefix_mask(self.inner, active['inner'], x.dtype)
      i_n = active['inner']
      attn_active = {'heads': active['heads'], 'kv_groups': active['kv_groups'],
                     'head_dim': self.attn.head_dim}
      ffn_active = active['ffn']
    imask = (lambda v: v) if im is None else (lambda v: v * im)
    hmask = (lambda v: v) if m is None else (lambda v: v * m)

    def linear(v, kernel, bias):
      y = jnp.einsum('BTD,DE->BTE', v, kernel[...].astype(v.dtype))
      return y if bias is None else y + bias[...].astype(v.dtype)

    attend = lambda z: imask(self.attn(z, ctx.attn_mask_BTS, ctx.positions_BT, attn_active,
                                       cap.store, ctx.segments_BT))
    if self.pre_norm:
      z = imask(linear(self.norm_io(x, m, n), self.proj_in, self.proj_in_bias))
      a = attend(self.norm_a(z, im, i_n))
      z = z + a
      f = imask(self.mlp(self.norm_f(z, im, i_n), ffn_active, cap.store, ffn_skip))
      z = z + f
      x = x + hmask(linear(z, self.proj_out, self.proj_out_bias))
    else:
      z = imask(linear(x, self.proj_in, self.proj_in_bias))
      a = attend(z)
      z = self.norm_a(z + a, im, i_n)
      f = imask(self.mlp(z, ffn_active, cap.store, ffn_skip))
      z = self.norm_f(z + f, im, i_n)
      x = self.norm_io(x + hmask(linear(z, self.proj_out, self.proj_out_bias)), m, n)
    cap.put('attn_out', a)
    cap.put('ffn_out', f)
    return x, cap.result()

  @staticmethod
  def cost(cfg: ModelConfig, s: dict) -> dict:
    h, i = s['hidden'], s['inner']
    attn_p, attn_mm = attention_cost(cfg, i, s['heads'], s['kv_groups'], s['bottleneck_head_dim'])
    mlp_p, mlp_mm = mlp_cost(cfg, i, s['ffn'])
    params = (norm_params(cfg, h) + 2 * norm_params(cfg, i) + linear_params(cfg, h, i)
              + linear_params(cfg, i, h) + attn_p + mlp_p)
    bh = s['bottleneck_head_dim']
    return {
        'params': params,
        'matmul_macs': 2 * h * i + attn_mm + mlp_mm,
        'attn_width': s['heads'] * bh,
        'kv_entries': 2 * s['kv_groups'] * bh,
        'act_entries': 3 * h + 5 * i + (2 * s['heads'] + 2 * s['kv_groups']) * bh
                       + (4 if cfg.mlp == 'swiglu' else 2) * s['ffn'],
        'heads': s['heads'],
    }


BLOCKS: dict[str, type[nnx.Module]] = {
    'transformer': TransformerBlock,
    'bottleneck': BottleneckBlock,
}
# FlexiBERT's operations (elastic_jax/model/flexibert.py), one registry entry per BLOCK_TYPES name.
BLOCKS.update(FLEXIBERT_BLOCK_CLASSES)


def equal_tokens_stay_equal(model: nnx.Module) -> bool:
  """Whether every block of `model` mixes tokens only by attention: then a sequence whose tokens
  all enter the first block as the same vector leaves the last one with every token equal to the
  output of that vector alone, as a one-token sequence (softmax weights sum to 1 over values that
  are all equal), whatever the attention mask, positions or rotary angles. False when any block
  convolves or transforms along the sequence (FlexiBERT's DSC and LT operations)."""
  kinds = tuple(BLOCKS.values())
  return all(m.averages_tokens for _, m in nnx.iter_modules(model) if isinstance(m, kinds))
