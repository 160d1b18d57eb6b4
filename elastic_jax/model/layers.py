"""Masked building blocks: norm, attention, MLP.

Every module is written for the dense model first: called with `active=None` it is an ordinary
layer of its own array sizes. Called with active sizes (traced int32 scalars) it computes exactly
what the dense layer holding the leading slice of its arrays would: elastic dimensions are prefixes
of every array axis, so masking a prefix and slicing a prefix agree. That is the invariant the
exporter relies on (`elastic_jax.export`), and the property tests check.

Parameters carry logical axis names (`out_sharding` metadata) used by the sharding rules:
  vocab, embed (hidden), factor (factorised embedding), heads, kv, head_dim, mlp, inner, pos, types.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax.config import ModelConfig
from elastic_jax.model.fused_attention import splash_attention, uses_kernel

Array = jax.Array


def dtype_of(name: str):
  return jnp.dtype(name)


def wide(dtype) -> jnp.dtype:
  """The dtype of norms, rotary angles, softmax and logits: float32, or the compute dtype where it
  is wider (float64, for verification runs)."""
  return jnp.promote_types(dtype, jnp.float32)


# Set inside `abstract_params()`: parameters are made as shapes only (no random draw, no trace).
_ABSTRACT = contextvars.ContextVar('elastic_jax_abstract_params', default=False)


@contextlib.contextmanager
def abstract_params():
  """Within it, modules are built with `jax.ShapeDtypeStruct` parameters: what `nnx.eval_shape`
  of the constructor gives, without tracing every initializer (the dense model an export fills
  is built this way: 2.4x faster per FlexiBERT export on this CPU)."""
  token = _ABSTRACT.set(True)
  try:
    yield
  finally:
    _ABSTRACT.reset(token)


def make_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], cfg: ModelConfig,
               init: str = 'normal') -> nnx.Param:
  """A parameter with logical axis names; 'normal' (std cfg.init_std), 'zeros' or 'ones'."""
  dtype = dtype_of(cfg.param_dtype)
  shape = tuple(int(s) for s in shape)
  if init not in ('normal', 'zeros', 'ones'):
    raise ValueError(init)
  if _ABSTRACT.get():
    value = jax.ShapeDtypeStruct(shape, dtype)
  elif init == 'normal':
    value = cfg.init_std * jax.random.normal(rngs.params(), shape, dtype)
  elif init == 'zeros':
    value = jnp.zeros(shape, dtype)
  else:
    value = jnp.ones(shape, dtype)
  return nnx.Param(value, sharding_names=tuple(axes), eager_sharding=False)


def activation(name: str, x: Array) -> Array:
  """The nonlinearity `name` of ModelConfig.mlp (SwiGLU's is SiLU, applied to the gate)."""
  if name == 'gelu':
    return jax.nn.gelu(x, approximate=False)
  if name == 'gelu_tanh':
    return jax.nn.gelu(x, approximate=True)
  if name == 'relu':
    return jax.nn.relu(x)
  if name == 'swiglu':
    return jax.nn.silu(x)
  raise ValueError(name)


def norm_params(cfg: ModelConfig, d):
  """Parameters of a norm over `d` features (scale, and bias unless RMSNorm)."""
  return d * (2 if cfg.use_bias and cfg.norm != 'rmsnorm' else 1)


def linear_params(cfg: ModelConfig, d_in, d_out):
  """Parameters of a `d_in -> d_out` linear map (bias per cfg.use_bias)."""
  return d_in * d_out + (d_out if cfg.use_bias else 0)


def prefix_mask(n_max: int, n_active, dtype) -> Array:
  """[n_max] ones on the first `n_active` entries, zeros after."""
  return (jnp.arange(n_max) < n_active).astype(dtype)


def segment_bounds(size: int, choices: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """The blocks [lo, hi) of `size` units cut at the space's choices below it (one block when
  there are none): a sub-network's active units are always whole blocks plus a masked tail."""
  bounds = sorted({int(c) for c in choices if 0 < c < size} | {size})
  return tuple(zip([0] + bounds[:-1], bounds))


def run_or_zeros(run, fn, x):
  """fn(x) where the traced bool `run` holds, else zeros shaped like fn's outputs, by `lax.cond`:
  one sub-network at a time, a block past its active size is never computed (under vmap, cond
  computes both sides and selects)."""
  shapes = jax.eval_shape(fn, x)
  zeros = lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return jax.lax.cond(run, fn, zeros, x)


class Norm(nnx.Module):
  """LayerNorm, RMSNorm or NoNorm over the last axis, statistics over the active features only."""

  def __init__(self, dim: int, axis_name: str, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.norm
    self.eps = cfg.norm_eps
    self.scale = make_param(rngs, (dim,), (axis_name,), cfg, 'ones')
    has_bias = cfg.use_bias and cfg.norm != 'rmsnorm'
    self.bias = make_param(rngs, (dim,), (axis_name,), cfg, 'zeros') if has_bias else None

  def __call__(self, x: Array, mask: Array | None = None, count=None) -> Array:
    """`mask` [D] selects the active features, `count` is their number (mask.sum())."""
    dtype, acc = x.dtype, wide(x.dtype)
    x = x.astype(acc)
    if self.kind != 'nonorm':
      if mask is None:
        mean_of = lambda v: jnp.mean(v, -1, keepdims=True)
      else:
        n = jnp.asarray(count, acc)
        mean_of = lambda v: jnp.sum(v * mask, -1, keepdims=True) / n
      if self.kind == 'layernorm':
        x = x - mean_of(x)
      x = x * jax.lax.rsqrt(mean_of(x * x) + self.eps)
    x = x * self.scale[...].astype(acc)
    if self.bias is not None:
      x = x + self.bias[...].astype(acc)
    if mask is not None:
      x = x * mask
    return x.astype(dtype)


def rotary(x_BTNH: Array, positions_BT: Array, head_dim_active, theta: float,
           hd_mask: Array | None) -> Array:
  """Rotary embedding on interleaved pairs (2i, 2i+1).

  Interleaved pairs keep the rotation of the first d' features identical for any active head size
  d', so a prefix of the head is a head of its own; frequencies use the *active* size so the
  masked head rotates exactly as the exported one. (Importers of rotate-half checkpoints such as
  Hugging Face Llama permute the q/k projections to this layout.)
  """
  h_max, acc = x_BTNH.shape[-1], wide(x_BTNH.dtype)
  pair = jnp.arange(h_max // 2, dtype=acc)
  inv_freq = theta ** (-2.0 * pair / jnp.asarray(head_dim_active, acc))
  angle_BTP = positions_BT[..., None].astype(acc) * inv_freq
  cos = jnp.cos(angle_BTP)[:, :, None, :]
  sin = jnp.sin(angle_BTP)[:, :, None, :]
  x = x_BTNH.astype(acc)
  x_even, x_odd = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
  out = out.reshape(x.shape)
  if hd_mask is not None:
    out = out * hd_mask
  return out.astype(x_BTNH.dtype)


class KVCache(nnx.Module):
  """Keys and values of one attention layer for decoding: [B, S, kv groups, head size] slots,
  preallocated; each call writes its T new entries at `index` and advances it by T."""

  def __init__(self, batch: int, slots: int, kv_groups: int, head_dim: int, dtype):
    self.k = nnx.Cache(jnp.zeros((batch, slots, kv_groups, head_dim), dtype))
    self.v = nnx.Cache(jnp.zeros((batch, slots, kv_groups, head_dim), dtype))
    self.index = nnx.Cache(jnp.zeros((), jnp.int32))

  def update(self, k_BTGH: Array, v_BTGH: Array) -> tuple[Array, Array]:
    """Writes the new entries; returns all slots [B, S, G, H] (unwritten ones are zeros)."""
    start = (0, self.index[...], 0, 0)
    self.k[...] = jax.lax.dynamic_update_slice(self.k[...], k_BTGH.astype(self.k.dtype), start)
    self.v[...] = jax.lax.dynamic_update_slice(self.v[...], v_BTGH.astype(self.v.dtype), start)
    self.index[...] = self.index[...] + k_BTGH.shape[1]
    return self.k[...].astype(k_BTGH.dtype), self.v[...].astype(v_BTGH.dtype)


def grouped_attention(q_BTNH: Array, k_BTGH: Array, v_BTGH: Array, attn_mask_BTS: Array,
                      scale) -> tuple[Array, Array]:
  """Softmax attention of N query heads over G key/value groups, query head n reading group
  n // (N / G): the queries reshaped to [B, T, G, N / G, H], so K and V are read as they are (no
  per-head copy). `scale` multiplies the queries. Logits from the compute-dtype matmul, softmax in
  float32 (float64 in verification runs). Returns (context [B, T, N, H], probabilities
  [B, N, T, S]; XLA drops the latter where nothing reads it)."""
  b, t, n, h = q_BTNH.shape
  s, g = k_BTGH.shape[1], k_BTGH.shape[2]
  dtype, acc = q_BTNH.dtype, wide(q_BTNH.dtype)
  if g == n:
    # Multi-head: the plain per-head einsums. With the grouped form at one head per group, XLA
    # planned the GPT-2-medium step for v5p:2x2x2 at 55.6 GiB per chip instead of 24.2.
    logits_BNTS = jnp.einsum('BTNH,BSNH->BNTS', q_BTNH * scale, k_BTGH).astype(acc)
    logits_BNTS = jnp.where(attn_mask_BTS[:, None], logits_BNTS, jnp.finfo(acc).min)
    probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1)
    return jnp.einsum('BNTS,BSNH->BTNH', probs_BNTS.astype(dtype), v_BTGH), probs_BNTS
  q_BTGRH = (q_BTNH * scale).reshape(b, t, g, n // g, h)
  logits_BGRTS = jnp.einsum('BTGRH,BSGH->BGRTS', q_BTGRH, k_BTGH).astype(acc)
  logits_BGRTS = jnp.where(attn_mask_BTS[:, None, None], logits_BGRTS, jnp.finfo(acc).min)
  probs_BGRTS = jax.nn.softmax(logits_BGRTS, axis=-1)
  out_BTGRH = jnp.einsum('BGRTS,BSGH->BTGRH', probs_BGRTS.astype(dtype), v_BTGH)
  return out_BTGRH.reshape(b, t, n, h), probs_BGRTS.reshape(b, n, t, s)


class Attention(nnx.Module):
  """Multi-head / grouped-query attention on a `width`-wide stream.

  Elastic: active query heads (a prefix), active KV groups (a prefix), active head size (a prefix of
  every head). Active query head h reads KV group h // (heads / kv_groups), the usual GQA mapping
  of a dense model with that many heads and groups. Where the heads-per-group ratio is static
  (dense models, multi-head spaces, spaces with one ratio) each head block reads its KV groups as
  they are (`grouped_attention`); only a space whose ratio varies gathers each head's group.

  `segments` (the space's head-count choices) split the query heads into blocks [n_i, n_{i+1});
  in the masked model a block beyond the active head count is skipped by `lax.cond` (its query
  projection, scores, context and output projection), as the MLP skips FFN column blocks. Dense
  models, and masked ones with `model.skip_width_blocks` off, have one block.
  """

  def __init__(self, width: int, width_axis: str, heads: int, kv_groups: int, head_dim: int,
               cfg: ModelConfig, *, rngs: nnx.Rngs, segments: Sequence[int] = (),
               kv_ratio: int = 0):
    self.cfg = cfg
    self.heads, self.kv_groups, self.head_dim = heads, kv_groups, head_dim
    # Query heads per KV group of every architecture the masked model runs, when the space fixes
    # it (LayerDims.kv_ratio); 0: it varies.
    if kv_ratio and (heads % kv_ratio or any(c % kv_ratio for c in segments)
                     or heads // kv_ratio > kv_groups):
      raise ValueError(f'kv_ratio {kv_ratio} does not group heads {heads} (segments '
                       f'{tuple(segments)}) into at most {kv_groups} KV groups')
    self.kv_ratio = kv_ratio
    self.head_bounds = segment_bounds(heads, segments if cfg.skip_width_blocks else ())
    w, n, g, h = width, heads, kv_groups, head_dim
    self.q = make_param(rngs, (w, n, h), (width_axis, 'heads', 'head_dim'), cfg)
    self.k = make_param(rngs, (w, g, h), (width_axis, 'kv', 'head_dim'), cfg)
    self.v = make_param(rngs, (w, g, h), (width_axis, 'kv', 'head_dim'), cfg)
    self.o = make_param(rngs, (n, h, w), ('heads', 'head_dim', width_axis), cfg)
    if cfg.attn_qkv_bias:
      self.q_bias = make_param(rngs, (n, h), ('heads', 'head_dim'), cfg, 'zeros')
      self.k_bias = make_param(rngs, (g, h), ('kv', 'head_dim'), cfg, 'zeros')
      self.v_bias = make_param(rngs, (g, h), ('kv', 'head_dim'), cfg, 'zeros')
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    self.o_bias = make_param(rngs, (w,), (width_axis,), cfg, 'zeros') if cfg.use_bias else None
    # A `KVCache` while decoding (set by elastic_jax.generate on dense models), else None.
    self.kv_cache = nnx.data(None)

  def _heads(self, x_BTD, k_BTGH, v_BTGH, lo: int, hi: int, kv_index, ratio: int, attn_mask_BTS,
             positions_BT, head_dim, head_mask, hd_mask, names, segments_BT):
    """Query heads [lo, hi): (output [B,T,D] before the bias, captures of these heads)."""
    cfg, dtype = self.cfg, x_BTD.dtype
    q_BTNH = jnp.einsum('BTD,DNH->BTNH', x_BTD, self.q[...][:, lo:hi].astype(dtype))
    if self.q_bias is not None:
      q_BTNH = q_BTNH + self.q_bias[...][lo:hi].astype(dtype)
    if cfg.positions == 'rotary':
      q_BTNH = rotary(q_BTNH, positions_BT, head_dim, cfg.rope_theta, hd_mask)
    elif hd_mask is not None:
      q_BTNH = q_BTNH * hd_mask
    if ratio:  # heads [lo, hi) read groups [lo / r, hi / r): the groups as they are, no gather
      k_BTGH, v_BTGH = k_BTGH[:, :, lo // ratio:hi // ratio], v_BTGH[:, :, lo // ratio:hi // ratio]
    else:  # the heads-per-group ratio is traced: each head's group gathered
      k_BTGH = jnp.take(k_BTGH, kv_index[lo:hi], axis=2)
      v_BTGH = jnp.take(v_BTGH, kv_index[lo:hi], axis=2)
    scale = jax.lax.rsqrt(jnp.asarray(head_dim, wide(dtype))).astype(dtype)
    if (segments_BT is not None and 'attn_probs' not in names
        and uses_kernel(cfg.attention, x_BTD.shape[1])):
      out_BTNH = splash_attention(q_BTNH * scale, k_BTGH, v_BTGH, segments_BT, causal=cfg.causal,
                                  interpret=cfg.attention == 'splash_interpret')
      probs_BNTS = None
    else:
      out_BTNH, probs_BNTS = grouped_attention(q_BTNH, k_BTGH, v_BTGH, attn_mask_BTS, scale)
    captured = {}
    if 'attn_probs' in names:
      captured['attn_probs'] = probs_BNTS if head_mask is None else \
          probs_BNTS * head_mask[lo:hi, None, None]
    if head_mask is not None:
      out_BTNH = out_BTNH * head_mask[lo:hi, None] * hd_mask
    if 'attn_heads' in names:
      captured['attn_heads'] = out_BTNH  # per-head context, before the output projection
    o_NHD = self.o[...][lo:hi].astype(dtype)
    if 'attn_head_out' in names:
      # Each head's share of the output (before the bias): what ELM's head pruning compares.
      captured['attn_head_out'] = jnp.einsum('BTNH,NHD->BTND', out_BTNH, o_NHD)
    return jnp.einsum('BTNH,NHD->BTD', out_BTNH, o_NHD), captured

  def __call__(self, x_BTD: Array, attn_mask_BTS: Array, positions_BT: Array,
               active: dict | None = None, capture: dict | None = None,
               segments_BT: Array | None = None) -> Array:
    """`active`: {'heads', 'kv_groups', 'head_dim'} traced sizes, or None for the dense layer.
    `segments_BT`: the segment ids `attn_mask_BTS` was made from (`blocks.Context`), which a
    fused kernel (`model.attention`) reads instead; None: the mask is all there is."""
    cfg = self.cfg
    dtype = x_BTD.dtype
    names = () if capture is None else capture['names']
    if 'attn_in' in names:
      capture['attn_in'] = x_BTD
    k_BTGH = jnp.einsum('BTD,DGH->BTGH', x_BTD, self.k[...].astype(dtype))
    v_BTGH = jnp.einsum('BTD,DGH->BTGH', x_BTD, self.v[...].astype(dtype))
    if self.k_bias is not None:
      k_BTGH = k_BTGH + self.k_bias[...].astype(dtype)
      v_BTGH = v_BTGH + self.v_bias[...].astype(dtype)

    if active is None:
      heads, groups, head_dim = self.heads, self.kv_groups, self.head_dim
      head_mask = hd_mask = None
    else:
      heads, groups, head_dim = active['heads'], active['kv_groups'], active['head_dim']
      head_mask = prefix_mask(self.heads, heads, dtype)
      hd_mask = prefix_mask(self.head_dim, head_dim, dtype)
    # Rotary acts per head, so rotating the KV groups before the GQA gather is exact (and is what
    # a KV cache stores).
    if cfg.positions == 'rotary':
      k_BTGH = rotary(k_BTGH, positions_BT, head_dim, cfg.rope_theta, hd_mask)
    if self.kv_cache is not None:  # keys S are the cache's slots; attn_mask_BTS covers them
      k_BTGH, v_BTGH = self.kv_cache.update(k_BTGH, v_BTGH)
      segments_BT = None
    # Query head n reads group n // (heads / groups). The ratio is static in a dense model and in
    # a space where every architecture has the same one (`kv_ratio`: 1 for multi-head attention);
    # otherwise it is traced, and inactive heads read group 0 (masked later).
    ratio = self.heads // self.kv_groups if active is None else self.kv_ratio
    kv_index = None
    if not ratio:
      per_group = jnp.maximum(jnp.asarray(heads) // jnp.asarray(groups), 1)
      kv_index = jnp.minimum(jnp.arange(self.heads) // per_group, self.kv_groups - 1)
    want = tuple(n for n in ('attn_probs', 'attn_heads', 'attn_head_out') if n in names)
    run = lambda x, lo, hi: self._heads(x, k_BTGH, v_BTGH, lo, hi, kv_index, ratio, attn_mask_BTS,
                                        positions_BT, head_dim, head_mask, hd_mask, want,
                                        segments_BT)
    out_BTD, parts = None, []
    for lo, hi in self.head_bounds:
      if active is None or lo == 0:
        seg, captured = run(x_BTD, lo, hi)
      else:
        seg, captured = run_or_zeros(lo < heads, lambda x, lo=lo, hi=hi: run(x, lo, hi), x_BTD)
      out_BTD = seg if out_BTD is None else out_BTD + seg
      parts.append(captured)
    for name, axis in (('attn_probs', 1), ('attn_heads', 2), ('attn_head_out', 2)):
      if name in want:
        capture[name] = jnp.concatenate([p[name] for p in parts], axis=axis) \
            if len(parts) > 1 else parts[0][name]
    if self.o_bias is not None:
      out_BTD = out_BTD + self.o_bias[...].astype(dtype)
    return out_BTD


class MLP(nnx.Module):
  """Feed-forward network width -> ffn -> width; the active FFN width is a prefix.

  `segments` (the space's FFN width choices) split the FFN into column blocks [c_i, c_{i+1}); in
  the masked model a block beyond the active width is skipped by `lax.cond`, so a narrow FFN
  executes close to its own FLOPs when archs run one at a time (under vmap, cond computes both
  sides and selects). Dense models, and masked ones with `model.skip_width_blocks` off, have one
  block.
  """

  def __init__(self, width: int, width_axis: str, ffn: int, cfg: ModelConfig, *, rngs: nnx.Rngs,
               segments: Sequence[int] = ()):
    self.kind = cfg.mlp
    self.ffn = ffn
    self.bounds = segment_bounds(ffn, segments if cfg.skip_width_blocks else ())
    self.up = make_param(rngs, (width, ffn), (width_axis, 'mlp'), cfg)
    self.gate = make_param(rngs, (width, ffn), (width_axis, 'mlp'), cfg) if cfg.mlp == 'swiglu' \
        else None
    self.down = make_param(rngs, (ffn, width), ('mlp', width_axis), cfg)
    if cfg.use_bias:
      self.up_bias = make_param(rngs, (ffn,), ('mlp',), cfg, 'zeros')
      self.gate_bias = make_param(rngs, (ffn,), ('mlp',), cfg, 'zeros') if self.gate is not None \
          else None
      self.down_bias = make_param(rngs, (width,), (width_axis,), cfg, 'zeros')
    else:
      self.up_bias = self.gate_bias = self.down_bias = None

  def _segment(self, x_BTD, lo: int, hi: int, ffn_active):
    """Pre-activation and activation [B,T,hi-lo] and output [B,T,D] of FFN columns [lo, hi)."""
    def linear(kernel, bias):
      y = jnp.einsum('BTD,DF->BTF', x_BTD, kernel[...][:, lo:hi].astype(x_BTD.dtype))
      return y if bias is None else y + bias[...][lo:hi].astype(x_BTD.dtype)
    up_BTF = linear(self.up, self.up_bias)
    if self.gate is None:
      pre_BTF = up_BTF
      act_BTF = activation(self.kind, up_BTF)
    else:
      pre_BTF = linear(self.gate, self.gate_bias)
      act_BTF = activation(self.kind, pre_BTF) * up_BTF
    if ffn_active is not None:
      ffn_mask = (jnp.arange(lo, hi) < ffn_active).astype(x_BTD.dtype)
      pre_BTF, act_BTF = pre_BTF * ffn_mask, act_BTF * ffn_mask
    out = jnp.einsum('BTF,FD->BTD', act_BTF, self.down[...][lo:hi].astype(x_BTD.dtype))
    return pre_BTF, act_BTF, out

  def __call__(self, x_BTD: Array, ffn_active=None, capture: dict | None = None,
               skip=None) -> Array:
    """`skip` (masked model only; traced bool): nothing reads this FFN's output (the last
    layer when only features up to its input are wanted), so no column block runs and the
    output and pre-activations are zeros; the `ffn_in` / `ffn_kernel` captures are unchanged."""
    pres, acts, out = [], [], None
    for lo, hi in self.bounds:
      if ffn_active is None or (lo == 0 and skip is None):
        pre, act, seg = self._segment(x_BTD, lo, hi, ffn_active)
      else:
        run = lo < ffn_active if skip is None else (lo < ffn_active) & ~skip
        pre, act, seg = run_or_zeros(
            run, lambda x, lo=lo, hi=hi: self._segment(x, lo, hi, ffn_active), x_BTD)
      pres.append(pre)
      acts.append(act)
      out = seg if out is None else out + seg
    if capture is not None:
      names = capture['names']
      if 'ffn_pre' in names:
        # The input of the nonlinearity; inactive columns are exact zeros.
        capture['ffn_pre'] = pres[0] if len(pres) == 1 else jnp.concatenate(pres, axis=-1)
      if 'ffn_act' in names:  # the input of the down projection (importance of FFN neurons)
        capture['ffn_act'] = acts[0] if len(acts) == 1 else jnp.concatenate(acts, axis=-1)
      if 'ffn_in' in names:
        capture['ffn_in'] = x_BTD
      if 'ffn_kernel' in names:
        # The first linear (the gate for SwiGLU): ffn_pre = ffn_in @ ffn_kernel + bias. Inactive
        # columns are zeroed, so the pair describes the sub-network's FFN exactly.
        kernel = (self.up if self.gate is None else self.gate)[...].astype(x_BTD.dtype)
        if ffn_active is not None:
          kernel = kernel * (jnp.arange(self.ffn) < ffn_active).astype(kernel.dtype)
        capture['ffn_kernel'] = kernel
    return out if self.down_bias is None else out + self.down_bias[...].astype(x_BTD.dtype)
