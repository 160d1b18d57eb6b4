"""FlexiBERT's operations as elastic blocks (Tuli et al., JAIR 2023; the NAS-Bench-BERT space of
Serianni & Kalita, ACL 2023).

Definitions follow the benchmark's reference (`modeling_electra.py` of aaronserianni/
training-free-nas): a post-norm ELECTRA layer whose token-mixing operation is one of

  sa_sdp  self-attention, scaled dot-product scores;
  sa_wma  self-attention with weighted multiplicative scores: the query goes through one more
          (bias-free) hidden x hidden linear map before q.k;
  lt_dft  linear transform: a linear projection, then per head the real part of the 2-D Fourier
          transform over (sequence, head features) (FNet-style, torch.fft.fft2(...).real);
  lt_dct  the same with the 2-D type-II cosine transform (unnormalised, scipy's `dct(type=2)`);
  dsc_5, dsc_9  ConvBERT's span-based dynamic convolution with kernel 5 / 9: heads/2 attention
          heads plus heads/2 convolution heads whose per-token kernels come from a softmax over a
          linear map of (separable-convolution keys x queries);

followed by 1..n stacked FFN linears (FlexiBERT's num_feed_forward): hidden -> F -> ... -> F ->
hidden, the activation after every linear but the last. Head size is hidden / heads (FlexiBERT
splits the hidden size into heads). SA and DSC end with an output linear, residual and LayerNorm;
LT has neither (as in the reference: its output goes straight into the FFN, whose residual is
around it); every layer ends with LayerNorm(FFN(a) + a).

Elastic: hidden size (global), heads, FFN width (a prefix) and the number of stacked FFN linears
per layer. Because the head size hidden / heads changes with the head count, the masked supernet
assigns feature c to head c // (hidden / heads) with a one-hot [heads, features] matrix instead of
a reshape (exact: the exported dense model reshapes); the within-head transforms of LT are
block-diagonal matrices built from the traced head size. LT and DSC mix every position of the row
(padding and packed documents included, as the reference does), so they are encoder-only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax.config import LayerDims, ModelConfig, ModelDims
from elastic_jax.model.layers import (
    Attention,
    Norm,
    activation,
    linear_params,
    make_param,
    norm_params,
    prefix_mask,
)

Array = jax.Array


def _act(cfg: ModelConfig, x):
  return activation(cfg.mlp, x)  # FlexiBERT spaces refuse SwiGLU (config.py)


class _Linear(nnx.Module):
  """y = x @ kernel + bias; elastic input / output widths are prefixes (the caller masks)."""

  def __init__(self, d_in, d_out, axes, cfg: ModelConfig, *, rngs, bias: bool = True):
    self.kernel = make_param(rngs, (d_in, d_out), axes, cfg)
    self.bias = (make_param(rngs, (d_out,), axes[1:], cfg, 'zeros') if bias and cfg.use_bias
                 else None)

  def __call__(self, x):
    y = jnp.einsum('BTD,DE->BTE', x, self.kernel[...].astype(x.dtype))
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)


def head_onehot(num_heads_max: int, width_max: int, width, heads, dtype) -> Array:
  """[num_heads_max, width_max]: 1 where feature c belongs to head j = c // (width / heads) and
  c < width (so j < heads); traced `width` and `heads` give the masked supernet's head split."""
  c = jnp.arange(width_max)
  size = jnp.maximum(jnp.asarray(width) // jnp.asarray(heads), 1)
  j = jnp.arange(num_heads_max)[:, None]
  return ((c[None, :] < width) & (c[None, :] // size == j)).astype(dtype)


def _within_head_index(width_max: int, width, heads):
  """(index of each feature inside its head, head of each feature, head size)."""
  c = jnp.arange(width_max)
  size = jnp.maximum(jnp.asarray(width) // jnp.asarray(heads), 1)
  return c % size, c // size, size


def transform_matrices(kind: str, n: int) -> tuple[Array, Array | None]:
  """The sequence transforms over n positions: DFT (cos, sin) with F = cos - i sin, or the
  unnormalised DCT-II matrix D[k, t] = 2 cos(pi k (2t + 1) / 2n) (and None)."""
  k = jnp.arange(n)[:, None]
  t = jnp.arange(n)[None, :]
  if kind == 'dft':
    angle = 2.0 * math.pi * ((k * t) % n).astype(jnp.float32) / n
    return jnp.cos(angle), jnp.sin(angle)
  angle = math.pi * ((k * (2 * t + 1)) % (4 * n)).astype(jnp.float32) / (2 * n)
  return 2.0 * jnp.cos(angle), None


def blockwise_matrices(kind: str, width_max: int, width, heads) -> tuple[Array, Array | None]:
  """The within-head transforms as block-diagonal [width_max, width_max] matrices (zero outside
  the active width): entry [l, c] of head-local indices (l', c') of the same head of size d is the
  DFT's cos / sin(2 pi l' c' / d) or the DCT's 2 cos(pi l' (2 c' + 1) / 2d)."""
  i, head, d = _within_head_index(width_max, width, heads)
  c = jnp.arange(width_max)
  same = (head[:, None] == head[None, :]) & (c[:, None] < width) & (c[None, :] < width)
  same = same.astype(jnp.float32)
  li, ci = i[:, None], i[None, :]
  if kind == 'dft':
    angle = 2.0 * math.pi * ((li * ci) % d).astype(jnp.float32) / d
    return jnp.cos(angle) * same, jnp.sin(angle) * same
  angle = math.pi * ((li * (2 * ci + 1)) % (4 * d)).astype(jnp.float32) / (2 * d)
  return 2.0 * jnp.cos(angle) * same, None


class StackedFFN(nnx.Module):
  """hidden -> F -> (ffn_layers - 1) x (F -> F) -> hidden, activation after all but the last.

  Parameter names follow `layers.MLP` (up, down) so proxies find the FFN kernels; the stacked
  F x F linears are one array `mid` [ffn_layers - 1, F, F]. Masked: the active width is a prefix
  of F, and stacked linears beyond the layer's count are skipped (`lax.cond`: outside vmap they do
  not run; under vmap a select keeps the input)."""

  def __init__(self, width: int, ffn: int, ffn_layers: int, cfg: ModelConfig, *, rngs):
    self.cfg = cfg
    self.ffn = ffn
    self.ffn_layers = ffn_layers
    self.up = make_param(rngs, (width, ffn), ('embed', 'mlp'), cfg)
    self.down = make_param(rngs, (ffn, width), ('mlp', 'embed'), cfg)
    self.mid = (make_param(rngs, (ffn_layers - 1, ffn, ffn), ('stack', 'mlp', None), cfg)
                if ffn_layers > 1 else None)
    if cfg.use_bias:
      self.up_bias = make_param(rngs, (ffn,), ('mlp',), cfg, 'zeros')
      self.down_bias = make_param(rngs, (width,), ('embed',), cfg, 'zeros')
      self.mid_bias = (make_param(rngs, (ffn_layers - 1, ffn), ('stack', 'mlp'), cfg, 'zeros')
                       if ffn_layers > 1 else None)
    else:
      self.up_bias = self.down_bias = self.mid_bias = None

  def __call__(self, x_BTD, ffn_active=None, layers_active=None, capture: dict | None = None):
    dtype = x_BTD.dtype
    pre_BTF = jnp.einsum('BTD,DF->BTF', x_BTD, self.up[...].astype(dtype))
    if self.up_bias is not None:
      pre_BTF = pre_BTF + self.up_bias[...].astype(dtype)
    fmask = None if ffn_active is None else prefix_mask(self.ffn, ffn_active, dtype)
    if fmask is not None:
      pre_BTF = pre_BTF * fmask
    h_BTF = _act(self.cfg, pre_BTF)
    for i in range(self.ffn_layers - 1):
      def stacked(h, i=i):
        y = jnp.einsum('BTF,FG->BTG', h, self.mid[...][i].astype(dtype))
        if self.mid_bias is not None:
          y = y + self.mid_bias[...][i].astype(dtype)
        y = _act(self.cfg, y)
        return y if fmask is None else y * fmask
      if layers_active is None:
        h_BTF = stacked(h_BTF)
      else:
        h_BTF = jax.lax.cond(i + 1 < layers_active, stacked, lambda h: h, h_BTF)
    out = jnp.einsum('BTF,FD->BTD', h_BTF, self.down[...].astype(dtype))
    if self.down_bias is not None:
      out = out + self.down_bias[...].astype(dtype)
    if capture is not None:
      names = capture['names']
      if 'ffn_pre' in names:
        capture['ffn_pre'] = pre_BTF
      if 'ffn_in' in names:
        capture['ffn_in'] = x_BTD
      if 'ffn_kernel' in names:
        kernel = self.up[...].astype(dtype)
        capture['ffn_kernel'] = kernel if fmask is None else kernel * fmask
    return out


class FlexiBlock(nnx.Module):
  """A post-norm ELECTRA layer around one FlexiBERT operation (subclasses define `mix`)."""

  residual_norm = True  # SA and DSC: LayerNorm(x + op(x)); LT feeds op(x) straight to the FFN
  averages_tokens = False  # LT and DSC mix along the sequence (see blocks.equal_tokens_stay_equal)

  def __init__(self, cfg: ModelConfig, dims: ModelDims, layer: LayerDims, *, rngs: nnx.Rngs):
    self.hidden = dims.hidden
    self.heads = layer.heads
    self.build(cfg, dims.hidden, layer.heads, rngs)
    self.norm1 = Norm(dims.hidden, 'embed', cfg, rngs=rngs) if self.residual_norm else None
    self.mlp = StackedFFN(dims.hidden, layer.ffn, layer.ffn_layers, cfg, rngs=rngs)
    self.norm2 = Norm(dims.hidden, 'embed', cfg, rngs=rngs)

  def build(self, cfg, width, heads, rngs):
    raise NotImplementedError

  def mix(self, x_BTD, ctx, width, heads, capture):
    raise NotImplementedError

  def __call__(self, x: Array, ctx, active: dict | None):
    names = ctx.capture
    store = {'names': names}
    m, n = ctx.hidden_mask, ctx.hidden_count
    mask = (lambda v: v) if m is None else (lambda v: v * m)
    if active is None:
      width, heads, ffn, ffn_layers = self.hidden, self.heads, None, None
    else:
      width, heads, ffn, ffn_layers = n, active['heads'], active['ffn'], active['ffn_layers']
    a = mask(self.mix(x, ctx, width, heads, store))
    if self.residual_norm:
      a = self.norm1(x + a, m, n)
    f = mask(self.mlp(a, ffn, ffn_layers, store))
    out = self.norm2(a + f, m, n)
    if 'attn_probs' in names and 'attn_probs' not in store:
      b, t = x.shape[:2]
      store['attn_probs'] = jnp.zeros((b, self.heads, t, t), jnp.float32)
    store['attn_out'] = a
    store['ffn_out'] = f
    return out, {k: v for k, v in store.items() if k in names}

  @classmethod
  def cost(cls, cfg: ModelConfig, s: dict) -> dict:
    h, f, n = s['hidden'], s['ffn'], s['ffn_layers']
    mix = cls.mix_cost(cfg, h, s['heads'])
    ffn_p = (linear_params(cfg, h, f) + (n - 1) * linear_params(cfg, f, f)
             + linear_params(cfg, f, h))
    norms = (2 if cls.residual_norm else 1) * norm_params(cfg, h)
    return {
        'params': mix['params'] + ffn_p + norms,
        'matmul_macs': mix['macs'] + 2 * h * f + (n - 1) * f * f,
        'attn_width': mix['attn_width'],
        'kv_entries': mix['kv_entries'],
        'act_entries': mix['act_entries'] + 4 * h + 2 * n * f,
        'heads': mix['heads'],
    }


class SelfAttention(Attention):
  """Multi-head attention over the whole hidden width split into `heads` heads of size
  width / heads; with `weighted`, the query passes a bias-free width x width linear first (WMA).
  (An `Attention` so proxies treat its q / k like every attention's.)"""

  def __init__(self, width: int, heads: int, cfg: ModelConfig, *, rngs, weighted: bool,
               out_width: int | None = None):
    # Not Attention.__init__: q / k / v / o are [width, width] maps here (head split is dynamic).
    inner = out_width or width
    self.cfg = cfg
    self.width, self.inner, self.max_heads = width, inner, heads
    self.q = make_param(rngs, (width, inner), ('embed', 'heads'), cfg)
    self.k = make_param(rngs, (width, inner), ('embed', 'heads'), cfg)
    self.v = make_param(rngs, (width, inner), ('embed', 'heads'), cfg)
    self.wq = make_param(rngs, (inner, inner), ('heads', None), cfg) if weighted else None
    self.o = make_param(rngs, (inner, width), ('heads', 'embed'), cfg)
    if cfg.use_bias:
      self.q_bias = make_param(rngs, (inner,), ('heads',), cfg, 'zeros')
      self.k_bias = make_param(rngs, (inner,), ('heads',), cfg, 'zeros')
      self.v_bias = make_param(rngs, (inner,), ('heads',), cfg, 'zeros')
      self.o_bias = make_param(rngs, (width,), ('embed',), cfg, 'zeros')
    else:
      self.q_bias = self.k_bias = self.v_bias = self.o_bias = None

  def output(self, ctx_BTC, extra_BTD=None):
    """The output map of the context (+ `extra_BTD`, e.g. DSC's convolution side), + bias."""
    out = jnp.einsum('BTC,CD->BTD', ctx_BTC, self.o[...].astype(ctx_BTC.dtype))
    if extra_BTD is not None:
      out = out + extra_BTD
    return out if self.o_bias is None else out + self.o_bias[...].astype(out.dtype)

  def project(self, x, kernel, bias, amask):
    y = jnp.einsum('BTD,DC->BTC', x, kernel[...].astype(x.dtype))
    if bias is not None:
      y = y + bias[...].astype(x.dtype)
    return y if amask is None else y * amask

  def context(self, x_BTD, attn_mask_BTS, inner, heads, masked: bool, capture, q_BTC=None):
    """(context [B, T, inner] before the output map, q); `inner` = active attention width split
    into `heads` heads (traced when `masked`)."""
    dtype = x_BTD.dtype
    amask = prefix_mask(self.inner, inner, dtype) if masked else None
    q = self.project(x_BTD, self.q, self.q_bias, amask) if q_BTC is None else q_BTC
    k = self.project(x_BTD, self.k, self.k_bias, amask)
    v = self.project(x_BTD, self.v, self.v_bias, amask)
    q_scores = q
    if self.wq is not None:
      q_scores = jnp.einsum('BTC,CE->BTE', q, self.wq[...].astype(dtype))
      if amask is not None:
        q_scores = q_scores * amask
    size = jnp.asarray(inner) // jnp.asarray(heads)
    scale = jax.lax.rsqrt(jnp.asarray(size, jnp.float32)).astype(dtype)
    if masked:
      onehot_NC = head_onehot(self.max_heads, self.inner, inner, heads, dtype)
      logits = jnp.einsum('BTC,NC,BSC->BNTS', q_scores * scale, onehot_NC, k)
    else:
      b, t = x_BTD.shape[:2]
      split = lambda y: y.reshape(b, t, heads, -1)
      logits = jnp.einsum('BTNH,BSNH->BNTS', split(q_scores * scale), split(k))
    logits = jnp.where(attn_mask_BTS[:, None], logits.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if masked:
      probs = probs * (jnp.arange(self.max_heads) < heads).astype(probs.dtype)[:, None, None]
      ctx_BTC = jnp.einsum('BNTS,BSC,NC->BTC', probs.astype(dtype), v, onehot_NC)
    else:
      ctx_BTC = jnp.einsum('BNTS,BSNH->BTNH', probs.astype(dtype), split(v)).reshape(b, t, -1)
    if 'attn_probs' in capture['names']:
      capture['attn_probs'] = probs
    return ctx_BTC, q


class _SABlock(FlexiBlock):
  weighted = False
  averages_tokens = True

  def build(self, cfg, width, heads, rngs):
    self.attn = SelfAttention(width, heads, cfg, rngs=rngs, weighted=self.weighted)

  def mix(self, x, ctx, width, heads, capture):
    masked = ctx.hidden_mask is not None
    c, _ = self.attn.context(x, ctx.attn_mask_BTS, width, heads, masked, capture)
    return self.attn.output(c)

  @classmethod
  def mix_cost(cls, cfg, h, heads):
    params = 4 * linear_params(cfg, h, h) + (h * h if cls.weighted else 0)
    return {'params': params, 'macs': (5 if cls.weighted else 4) * h * h, 'attn_width': h,
            'kv_entries': 2 * h, 'act_entries': 5 * h, 'heads': heads}


class SDPBlock(_SABlock):
  """SA/SDP: scaled dot-product self-attention."""


class WMABlock(_SABlock):
  """SA/WMA: weighted multiplicative attention (an extra bias-free query map)."""
  weighted = True


class _LTBlock(FlexiBlock):
  """LT: a linear projection, then per head Re(2-D DFT) or the 2-D DCT-II over (sequence, head
  features); no output map, residual or norm (the FFN's residual is around it)."""

  residual_norm = False
  kind = ''

  def build(self, cfg, width, heads, rngs):
    self.proj = _Linear(width, width, ('embed', 'heads'), cfg, rngs=rngs)

  def mix(self, x, ctx, width, heads, capture):
    p_BTC = self.proj(x)
    seq_a, seq_b = transform_matrices(self.kind, x.shape[1])
    # Within-head transforms as block-diagonal matrices: from the traced head size in the masked
    # supernet (zero outside the active width, which also drops inactive features' bias), from
    # the static one in a dense model (where they are plain constants).
    width_max = self.hidden if ctx.hidden_mask is not None else width
    feat_a, feat_b = blockwise_matrices(self.kind, width_max, width, heads)

    def mixed(seq_KT, feat_LC):  # seq_KT @ P @ feat_LC^T, the sequence transform first
      y_BKC = jnp.einsum('KT,BTC->BKC', seq_KT.astype(p_BTC.dtype), p_BTC)
      return jnp.einsum('BKC,LC->BKL', y_BKC, feat_LC.astype(p_BTC.dtype))

    out = mixed(seq_a, feat_a)
    if seq_b is not None:  # Re(F_T P F_d) = C P C - S P S
      out = out - mixed(seq_b, feat_b)
    return out

  @classmethod
  def mix_cost(cls, cfg, h, heads):
    transforms = 2 if cls.kind == 'dft' else 1
    # attn_width: the sequence transform costs 2 * seq_len * attn_width MACs per token; the
    # within-head one runs as a block-diagonal hidden x hidden matrix.
    return {'params': linear_params(cfg, h, h), 'macs': (1 + transforms) * h * h,
            'attn_width': transforms * h // 2, 'kv_entries': 0, 'act_entries': 2 * h,
            'heads': 0}


class DFTBlock(_LTBlock):
  """LT/DFT: FNet-style Fourier mixing, per head."""
  kind = 'dft'


class DCTBlock(_LTBlock):
  """LT/DCT: 2-D cosine transform mixing, per head."""
  kind = 'dct'


class _DSCBlock(FlexiBlock):
  """DSC/k (ConvBERT's mixed attention, as the reference builds it): with A = hidden / 2 and
  heads / 2 heads of size hidden / heads on each side,
    attention: q, k, v = linear maps hidden -> A; scaled dot-product attention;
    convolution: s = separable_conv_k(x) (depthwise k-tap over the sequence, then hidden -> A)
      ; per token and head a softmax over k taps of linear(s * q) (A -> heads/2 * k) weighs the
      k neighbours (zero-padded) of linear(x) (hidden -> A), channel by channel;
  output = [attention | convolution] (hidden features) -> linear hidden -> hidden."""

  kernel_size = 0

  def build(self, cfg, width, heads, rngs):
    half = width // 2
    self.attn = SelfAttention(width, heads // 2, cfg, rngs=rngs, weighted=False, out_width=half)
    k = self.kernel_size
    self.depthwise = make_param(rngs, (k, width), (None, 'embed'), cfg)
    self.pointwise = make_param(rngs, (width, half), ('embed', 'heads'), cfg)
    self.pointwise_bias = make_param(rngs, (half,), ('heads',), cfg, 'zeros')
    self.conv_kernel = _Linear(half, (heads // 2) * k, ('heads', None), cfg, rngs=rngs)
    self.conv_value = _Linear(width, half, ('embed', 'heads'), cfg, rngs=rngs)
    self.o_conv = make_param(rngs, (half, width), ('heads', 'embed'), cfg)

  def _shifted(self, x_BTC) -> Array:
    """[B, T, C, k]: x at positions t - (k-1)/2 .. t + (k-1)/2 (zeros beyond the row)."""
    k = self.kernel_size
    t = x_BTC.shape[1]
    pad = jnp.pad(x_BTC, ((0, 0), ((k - 1) // 2, (k - 1) // 2), (0, 0)))
    return jnp.stack([pad[:, j:j + t] for j in range(k)], axis=-1)

  def mix(self, x, ctx, width, heads, capture):
    dtype = x.dtype
    masked = ctx.hidden_mask is not None
    k = self.kernel_size
    half = width // 2
    att_heads = heads // 2
    amask = prefix_mask(self.attn.inner, half, dtype) if masked else None
    ctx_BTA, q_BTA = self.attn.context(x, ctx.attn_mask_BTS, half, att_heads, masked, capture)
    # Separable convolution of the keys: depthwise k taps per channel, then pointwise.
    dw = jnp.einsum('BTCK,KC->BTC', self._shifted(x), self.depthwise[...].astype(dtype))
    s_BTA = jnp.einsum('BTC,CA->BTA', dw, self.pointwise[...].astype(dtype))
    s_BTA = s_BTA + self.pointwise_bias[...].astype(dtype)
    if amask is not None:
      s_BTA = s_BTA * amask
    logits = self.conv_kernel(s_BTA * q_BTA).astype(jnp.float32)
    b, t = x.shape[:2]
    logits_BTNK = logits.reshape(b, t, -1, k)
    weights_BTNK = jax.nn.softmax(logits_BTNK, axis=-1).astype(dtype)
    u_BTA = self.conv_value(x)
    if amask is not None:
      u_BTA = u_BTA * amask
    u_BTAK = self._shifted(u_BTA)
    if masked:
      onehot_NA = head_onehot(logits_BTNK.shape[2], self.attn.inner, half, att_heads, dtype)
      conv_BTA = jnp.einsum('BTAK,BTNK,NA->BTA', u_BTAK, weights_BTNK, onehot_NA)
    else:
      u_BTNHK = u_BTAK.reshape(b, t, att_heads, -1, k)
      conv_BTA = jnp.einsum('BTNHK,BTNK->BTNH', u_BTNHK, weights_BTNK).reshape(b, t, half)
    # The output map reads [attention | convolution]: rows split into attn.o and o_conv.
    out = self.attn.output(ctx_BTA, jnp.einsum('BTA,AD->BTD', conv_BTA,
                                               self.o_conv[...].astype(dtype)))
    if 'attn_probs' in capture['names']:  # pad to the layer's head count (switch branches agree)
      p = capture['attn_probs']
      capture['attn_probs'] = jnp.pad(p, ((0, 0), (0, self.heads - p.shape[1]), (0, 0), (0, 0)))
    return out

  @classmethod
  def mix_cost(cls, cfg, h, heads):
    a, k, n = h // 2, cls.kernel_size, heads // 2
    params = (4 * linear_params(cfg, h, a)  # q, k, v, conv value
              + k * h + h * a + a  # separable convolution (its bias always exists)
              + linear_params(cfg, a, n * k) + linear_params(cfg, h, h))  # conv kernel, output
    return {'params': params, 'macs': 4 * h * a + k * h + h * a + a * n * k + h * h + a * k,
            'attn_width': a, 'kv_entries': 2 * a, 'act_entries': 7 * a + n * k, 'heads': n}


class DSC5Block(_DSCBlock):
  """DSC/5: dynamic convolution, kernel 5."""
  kernel_size = 5


class DSC9Block(_DSCBlock):
  """DSC/9: dynamic convolution, kernel 9."""
  kernel_size = 9


FLEXIBERT_BLOCK_CLASSES = {
    'sa_sdp': SDPBlock,
    'sa_wma': WMABlock,
    'lt_dft': DFTBlock,
    'lt_dct': DCTBlock,
    'dsc_5': DSC5Block,
    'dsc_9': DSC9Block,
}
