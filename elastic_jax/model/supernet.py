"""The elastic language model: embeddings, a stack of elastic layers, an output head.

One class serves both roles:
- `Model(cfg, space.supernet_dims())` is the weight-shared supernet; call it with an `Arch` (a
  pytree of int32 arrays) and it computes that sub-network by masking. The arch is data, so one
  compiled program serves every sub-network, and `jax.vmap` over archs evaluates a population.
- `Model(cfg, dims_of_one_arch)` is an exported dense model; call it with `arch=None`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax.config import BLOCK_TYPES, SKIP, LayerDims, ModelConfig, ModelDims
from elastic_jax.model.blocks import BLOCK_CAPTURES, BLOCKS, WIDTH_AXIS, Context
from elastic_jax.model.layers import Norm, activation, make_param, prefix_mask, wide
from elastic_jax.scone.model import (
    FgramModel,
    fgram_embeddings,
    fgram_limit,
    match_lengths,
    windows,
)

Array = jax.Array

# Everything `capture=` can ask for: per-layer block features, plus 'embed' (embedding output)
# and 'hidden' (each layer's output).
CAPTURES = ('embed', 'hidden') + BLOCK_CAPTURES

# `model.remat` of every layer, scanned or not: what the backward pass keeps rather than
# recomputes.
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
}


class Embedding(nnx.Module):
  """Token (optionally factorised), learned position and token-type embeddings."""

  def __init__(self, cfg: ModelConfig, dims: ModelDims, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h = self.hidden = dims.hidden
    table_width, table_axis = (cfg.embed_dim, 'factor') if cfg.factorised else (h, 'embed')
    self.tokens = make_param(rngs, (cfg.vocab_size, table_width), ('vocab', table_axis), cfg)
    if cfg.factorised:
      self.proj = make_param(rngs, (cfg.embed_dim, h), ('factor', 'embed'), cfg)
      self.proj_bias = make_param(rngs, (h,), ('embed',), cfg, 'zeros') if cfg.use_bias else None
    self.positions = (make_param(rngs, (cfg.max_len, h), ('pos', 'embed'), cfg)
                      if cfg.positions == 'learned' else None)
    self.types = (make_param(rngs, (cfg.type_vocab_size, h), ('types', 'embed'), cfg)
                  if cfg.type_vocab_size else None)
    self.norm = Norm(h, 'embed', cfg, rngs=rngs) if cfg.norm_placement == 'post' else None

  def token_vectors(self, tokens_BT) -> Array:
    """The hidden-wide token embeddings of `tokens_BT` (any leading shape), before positions."""
    dtype = jnp.dtype(self.cfg.dtype)
    x = jnp.take(self.tokens[...], tokens_BT, axis=0).astype(dtype)
    if self.cfg.factorised:
      x = jnp.einsum('...E,ED->...D', x, self.proj[...].astype(dtype))
      if self.proj_bias is not None:
        x = x + self.proj_bias[...].astype(dtype)
    return x

  def __call__(self, tokens_BT, positions_BT, types_BT, hidden_mask, hidden_count,
               fgram=None, vectors_BTW=None) -> Array:
    """`fgram`: None, or (embeddings [B, T, hidden], on [B, T] bool): SCONE's f-gram embeddings
    replace the token embeddings where `on` (elastic_jax/scone/model.py). `vectors_BTW`: None, or
    the `token_vectors` of `tokens_BT` already looked up in a model at least as wide whose table
    this one's is a hidden prefix of (the training step's supernet, read by every sub-network:
    one lookup, and one scatter-add in the backward pass, for all of them); the first hidden
    features are this model's token vectors."""
    dtype = jnp.dtype(self.cfg.dtype)
    if vectors_BTW is None:
      x = self.token_vectors(tokens_BT)
    else:
      x = vectors_BTW[..., :self.hidden]
    if fgram is not None:
      emb_BTD, on_BT = fgram
      x = jnp.where(on_BT[..., None], emb_BTD.astype(dtype), x)
    if self.positions is not None:
      x = x + jnp.take(self.positions[...], positions_BT, axis=0).astype(dtype)
    if self.types is not None:
      x = x + jnp.take(self.types[...], types_BT, axis=0).astype(dtype)
    if hidden_mask is not None:
      x = x * hidden_mask
    if self.norm is not None:
      x = self.norm(x, hidden_mask, hidden_count)
    return x


class Head(nnx.Module):
  """Final norm (pre-norm models), optional MLM transform, vocabulary projection (maybe tied)."""

  def __init__(self, cfg: ModelConfig, dims: ModelDims, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h = dims.hidden
    out_width, out_axis = (cfg.embed_dim, 'factor') if cfg.factorised else (h, 'embed')
    self.pre_logits_width = out_width  # the last axis of `pre_logits`
    self.final_norm = Norm(h, 'embed', cfg, rngs=rngs) if cfg.norm_placement == 'pre' else None
    transform = cfg.head_transform
    self.transform = make_param(rngs, (h, out_width), ('embed', out_axis), cfg) if transform \
        else None
    self.transform_bias = (make_param(rngs, (out_width,), (out_axis,), cfg, 'zeros')
                           if transform and cfg.use_bias else None)
    self.transform_norm = Norm(out_width, out_axis, cfg, rngs=rngs) if transform else None
    self.unembed = (make_param(rngs, (h, out_width), ('embed', out_axis), cfg)
                    if cfg.factorised and not transform else None)
    self.out = (None if cfg.tie_embeddings
                else make_param(rngs, (out_width, cfg.vocab_size), (out_axis, 'vocab'), cfg))
    self.out_bias = (make_param(rngs, (cfg.vocab_size,), ('vocab',), cfg, 'zeros')
                     if cfg.output_bias else None)

  def normed(self, x_BTD, hidden_mask, hidden_count) -> Array:
    """The last hidden states as the model outputs them (after the final norm of pre-norm
    models): what Hugging Face calls `last_hidden_state`."""
    if self.final_norm is not None:
      x_BTD = self.final_norm(x_BTD, hidden_mask, hidden_count)
    return x_BTD

  def pre_logits(self, x_BTD, hidden_mask, hidden_count) -> Array:
    """The vocabulary projection's input [B, T, E]: the final norm, then the MLM transform or the
    factorised unembedding, if any (E: the hidden or the factorised width)."""
    cfg = self.cfg
    x_BTD = self.normed(x_BTD, hidden_mask, hidden_count)
    if self.transform is not None:
      x_BTD = jnp.einsum('BTD,DE->BTE', x_BTD, self.transform[...].astype(x_BTD.dtype))
      if self.transform_bias is not None:
        x_BTD = x_BTD + self.transform_bias[...].astype(x_BTD.dtype)
      x_BTD = activation('gelu' if cfg.mlp == 'swiglu' else cfg.mlp, x_BTD)
      # Without a factorised embedding the transform's output is the (elastic) hidden width.
      mask, count = (None, None) if cfg.factorised else (hidden_mask, hidden_count)
      x_BTD = self.transform_norm(x_BTD, mask, count)
    elif self.unembed is not None:
      x_BTD = jnp.einsum('BTD,DE->BTE', x_BTD, self.unembed[...].astype(x_BTD.dtype))
    return x_BTD

  def project(self, x_E, token_table_VE) -> Array:
    """Logits [..., V] (float32; float64 in a float64 model) of pre-logit states `x_E` of any
    leading shape (the token embedding `token_table_VE` is the projection when tied)."""
    table_EV = token_table_VE.T if self.out is None else self.out[...]
    acc = wide(x_E.dtype)
    logits = jnp.einsum('...E,EV->...V', x_E, table_EV.astype(x_E.dtype)).astype(acc)
    if self.out_bias is not None:
      logits = logits + self.out_bias[...].astype(acc)
    return logits

  def __call__(self, x_BTD, token_table_VE, hidden_mask, hidden_count) -> Array:
    return self.project(self.pre_logits(x_BTD, hidden_mask, hidden_count), token_table_VE)


class Pooler(nnx.Module):
  """BERT's pooler: tanh(dense(first token's last hidden state)), for sentence-level heads."""

  def __init__(self, cfg: ModelConfig, dims: ModelDims, *, rngs: nnx.Rngs):
    h = dims.hidden
    self.kernel = make_param(rngs, (h, h), ('embed', 'embed_out'), cfg)
    self.bias = make_param(rngs, (h,), ('embed_out',), cfg, 'zeros')

  def __call__(self, x_BTD: Array, hidden_mask: Array | None) -> Array:
    y_BD = jnp.einsum('BD,DE->BE', x_BTD[:, 0], self.kernel[...].astype(x_BTD.dtype))
    y_BD = jnp.tanh(y_BD + self.bias[...].astype(x_BTD.dtype))
    return y_BD if hidden_mask is None else y_BD * hidden_mask


class Layer(nnx.Module):
  """One layer: the weights of every block type it may take, and the choice among them."""

  def __init__(self, cfg: ModelConfig, dims: ModelDims, layer: LayerDims, *, rngs: nnx.Rngs):
    self.kinds = tuple(layer.blocks)
    self.hidden = dims.hidden
    self.inner = layer.inner
    self.blocks = nnx.Dict({k: BLOCKS[k](cfg, dims, layer, rngs=rngs) for k in self.kinds})
    # Registry id -> branch of lax.switch; unknown ids and 'skip' go to the identity branch.
    self.branch_of = tuple(self.kinds.index(b) if b in self.kinds else len(self.kinds)
                           for b in BLOCK_TYPES)

  def _padded(self, feats: dict, x: Array) -> dict:
    """Pads block features to one width so every switch branch returns the same shapes."""
    width = max(self.hidden, self.inner)
    out = {}
    for k, v in feats.items():
      axis = WIDTH_AXIS.get(k)
      if axis is not None and v.shape[axis] < width:
        pad = [(0, 0)] * v.ndim
        pad[axis] = (0, width - v.shape[axis])
        v = jnp.pad(v, pad)
      out[k] = v
    return out

  def __call__(self, x: Array, ctx: Context, active: dict | None = None, on=None, block=None):
    """Dense: `active` is None and the layer's single block runs. Masked: `block` (registry id)
    picks the branch, and an off layer (`on` False) is an exact identity."""
    if active is None:
      (kind,) = self.kinds
      return self.blocks[kind](x, ctx, None)

    def run(kind):
      def branch(x):
        y, feats = self.blocks[kind](x, ctx, active)
        return y, self._padded(feats, x)
      return branch

    branches = [run(k) for k in self.kinds]
    feats_shape = jax.eval_shape(branches[0], x)[1]
    branches.append(lambda x: (x, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                feats_shape)))
    branch = jnp.asarray(self.branch_of, jnp.int32)[block]
    branch = jnp.where(on, branch, len(self.kinds))
    if len(branches) == 1:
      return branches[0](x)
    # Outside vmap only the chosen block runs; under vmap switch becomes a select of all branches.
    return jax.lax.switch(branch, branches, x)


class Model(nnx.Module):
  """Elastic encoder or decoder language model (supernet or exported dense model)."""

  def __init__(self, cfg: ModelConfig, dims: ModelDims, *, rngs: nnx.Rngs, scone=None):
    """`scone`: a `SconeConfig` adds SCONE's f-gram model (elastic_jax/scone), else None."""
    self.cfg = cfg
    self.dims = dims
    self.embed = Embedding(cfg, dims, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, dims, l, rngs=rngs) for l in dims.layers])
    self.head = Head(cfg, dims, rngs=rngs)
    self.pooler = Pooler(cfg, dims, rngs=rngs) if cfg.pooler else None
    # Created last, so the main model's initialisation is the same with and without it.
    self.scone = FgramModel(cfg, dims.hidden, scone, rngs=rngs) if scone is not None else None

  def __call__(self, batch: Mapping[str, Array], arch=None, capture: tuple[str, ...] = ()):
    """Logits [B, T, vocab] (float32); with `capture`, also a dict of the named features.

    `batch`: `tokens` [B, T] int32 and optionally `positions`, `segment_ids` (0 = padding;
    attention stays within a segment), `token_types`, and `attn_mask` [B, T, S] (bool: may token
    t attend to key s; replaces the one made from segment ids, e.g. when the keys are a KV cache,
    see elastic_jax.generate). `arch`: an `Arch` for a sub-network of
    the supernet, or None for the model's own (dense) architecture.
    """
    x, (hidden_mask, hidden_count), features = self._trunk(batch, arch, capture)
    logits = self.head(x, self.embed.tokens[...], hidden_mask, hidden_count)
    if not capture:
      return logits
    return logits, features

  def pre_logits(self, batch: Mapping[str, Array], arch=None, capture: tuple[str, ...] = (), *,
                 scan: bool = False):
    """What the vocabulary projection reads, [B, T, E] (`__call__`'s logits are
    `project(pre_logits(...))`), and the captured features (a dict, empty without `capture`).

    For losses that project a few positions at a time rather than hold [B, T, vocab] logits.
    `scan`: a dense model runs its runs of same-shaped layers in a `lax.scan`, rematerialised by
    `model.remat`, as the masked supernet does with `model.scan_layers` (the training step's
    dense slices: one compiled layer instead of one per layer)."""
    x, (hidden_mask, hidden_count), features = self._trunk(batch, arch, capture, scan_dense=scan)
    return self.head.pre_logits(x, hidden_mask, hidden_count), features

  def project(self, x_E: Array) -> Array:
    """Logits [..., vocab] (float32) of pre-logit states [..., E] (see `pre_logits`)."""
    return self.head.project(x_E, self.embed.tokens[...])

  def last_logits(self, batch: Mapping[str, Array]) -> Array:
    """Logits [B, vocab] (float32) of each row's last position only: decoding needs no others,
    and the vocabulary projection of a whole prompt costs as much as a layer or more."""
    x, (hidden_mask, hidden_count), _ = self._trunk(batch, None, ())
    return self.head(x[:, -1:], self.embed.tokens[...], hidden_mask, hidden_count)[:, 0]

  def hidden_states(self, batch: Mapping[str, Array], arch=None, *,
                    pooled: bool = False) -> Array | tuple[Array, Array]:
    """The last hidden states [B, T, hidden] (after the final norm of pre-norm models; inactive
    features are zeros), and with `pooled` the pooler's output [B, hidden] too."""
    x, (hidden_mask, hidden_count), _ = self._trunk(batch, arch, ())
    x = self.head.normed(x, hidden_mask, hidden_count)
    if not pooled:
      return x
    if self.pooler is None:
      raise ValueError('this model has no pooler (model.pooler=False)')
    return x, self.pooler(x, hidden_mask)

  def features(self, batch: Mapping[str, Array], arch=None,
               capture: tuple[str, ...] = ()) -> dict:
    """Only the captured features (as `__call__` returns them), without the vocabulary
    projection (for zero-cost proxies that read nothing but inner activations)."""
    # Nothing reads the last active layer's FFN output unless one of these is captured: skip it.
    skip_last_ffn = not any(c in ('hidden', 'ffn_pre', 'ffn_act', 'ffn_out') for c in capture)
    return self._trunk(batch, arch, capture, skip_last_ffn)[2]

  def fgram_inputs(self, batch, hidden_mask=None, arch=None):
    """(f-gram embeddings [B, T, hidden], on [B, T]) of a SCONE model, or None.

    Inference: the batch carries precomputed rows `fgram_emb` [B, T, hidden] and their ids
    `fgram_ids` [B, T] (-1 = none), looked up on the host (elastic_jax/scone/table.py).
    Training: it carries the host lookup's `fgram_hits` [B, T, K-1] (and optionally `fgram_limit`
    [B], the number of f-grams used) and the f-gram model computes the embeddings, with the arch's
    f-gram count and f-gram model size. Neither: None (the token embeddings alone, as in a model
    without SCONE). An exported model has no f-gram model and reads only the inference inputs."""
    if 'fgram_emb' in batch:
      return batch['fgram_emb'], batch['fgram_ids'] >= 0
    if 'fgram_hits' not in batch or self.scone is None:
      return None
    tokens_BT = batch['tokens']
    b, t = tokens_BT.shape
    lengths_BT = match_lengths(batch['fgram_hits'], fgram_limit(arch, batch.get('fgram_limit'), b))
    tokens_NK = windows(tokens_BT, self.scone.k).reshape(b * t, self.scone.k)
    emb = fgram_embeddings(self.scone, self.embed.token_vectors, tokens_NK,
                           lengths_BT.reshape(-1), hidden_mask, arch)
    return emb.reshape(b, t, -1), lengths_BT > 0

  def _trunk(self, batch, arch, capture, skip_last_ffn: bool = False, scan_dense: bool = False):
    """(final hidden states, (hidden mask, active hidden count), {name: captured feature}).

    `skip_last_ffn`: the masked supernet skips the last active layer's FFN (whose output then
    is wrong: only for features read before it). A dense model needs no flag: XLA removes the
    computation nobody reads. `scan_dense`: see `pre_logits`."""
    unknown = set(capture) - set(CAPTURES)
    if unknown:
      raise ValueError(f'unknown capture names {sorted(unknown)}; known: {CAPTURES}')
    tokens_BT = batch['tokens']
    b, t = tokens_BT.shape
    positions_BT = batch.get('positions')
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    segments_BT = batch.get('segment_ids')
    if segments_BT is None:
      segments_BT = jnp.ones((b, t), jnp.int32)
    types_BT = batch.get('token_types')
    if types_BT is None:
      types_BT = jnp.zeros((b, t), jnp.int32)
    attn_mask_BTS = batch.get('attn_mask')
    mask_segments_BT = None
    if attn_mask_BTS is None:
      mask_segments_BT = segments_BT
      attn_mask_BTS = segments_BT[:, :, None] == segments_BT[:, None, :]
      if self.cfg.causal:
        attn_mask_BTS = attn_mask_BTS & jnp.tril(jnp.ones((t, t), bool))

    dtype = jnp.dtype(self.cfg.dtype)
    if arch is None:
      hidden_mask, hidden_count = None, self.dims.hidden
    else:
      hidden_mask, hidden_count = prefix_mask(self.dims.hidden, arch.hidden, dtype), arch.hidden
    ctx = Context(attn_mask_BTS, positions_BT, hidden_mask, hidden_count,
                  tuple(c for c in capture if c in BLOCK_CAPTURES), mask_segments_BT)

    fgram = self.fgram_inputs(batch, hidden_mask, arch)
    x = self.embed(tokens_BT, positions_BT, types_BT, hidden_mask, hidden_count, fgram,
                   batch.get('token_vectors'))
    features = {'embed': x, 'hidden': []} | {k: [] for k in BLOCK_CAPTURES}
    last_on = None
    if arch is not None and skip_last_ffn:
      on_L = arch.layer_on()
      last_on = len(self.layers) - 1 - jnp.argmax(on_L[::-1])
    for start, stop in self._layer_groups(arch is not None or scan_dense):
      if arch is None:
        x, hidden_L, feats_L = self._group(start, stop, x, lambda layer, x, _: layer(x, ctx), None)
      else:
        x, hidden_L, feats_L = self._masked_group(start, stop, x, ctx, arch, last_on)
      features['hidden'].extend(hidden_L)
      for k, v in feats_L.items():
        features[k].extend(v)
    return x, (hidden_mask, hidden_count), {k: features[k] for k in capture}

  def _layer_groups(self, scan: bool) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive layers that one `lax.scan` can run: the layers with the
    same parameter structure (a uniform space is one group), when `scan` (the masked supernet,
    or a dense model asked to) and `model.scan_layers` are on; otherwise one group per layer."""
    n = len(self.layers)
    if not (scan and self.cfg.scan_layers):
      return [(i, i + 1) for i in range(n)]
    def structure(layer):
      graphdef, state = nnx.split(layer)
      return graphdef, jax.tree.map(lambda v: (v.shape, v.dtype), state)
    groups, keys = [], [structure(layer) for layer in self.layers]
    for i in range(n):
      if groups and keys[i] == keys[groups[-1][0]]:
        groups[-1][1] = i + 1
      else:
        groups.append([i, i + 1])
    return [tuple(g) for g in groups]

  def _masked_group(self, start, stop, x, ctx, arch, last_on):
    """Runs layers [start, stop) of the supernet on arch `arch`: one `lax.scan` over their
    stacked parameters and per-layer arch fields (the compiled program's size no longer grows
    with depth), or the layer itself for a group of one. Returns (output, [hidden per layer],
    {feature: [per layer]})."""
    def apply(layer, x, i, fields):
      active = {'heads': fields['heads'], 'kv_groups': fields['kv_groups'],
                'head_dim': arch.head_dim, 'ffn': fields['ffn'], 'inner': fields['inner'],
                'ffn_layers': fields['ffn_layers']}
      if last_on is not None:
        active['ffn_skip'] = last_on == i
      on = (i < arch.depth) & (fields['block'] != SKIP)
      return layer(x, ctx, active, on, fields['block'])

    names = ('heads', 'kv_groups', 'ffn', 'inner', 'ffn_layers', 'block')
    fields_L = {k: getattr(arch, k)[start:stop] for k in names}
    return self._group(start, stop, x, lambda layer, x, inputs: apply(layer, x, *inputs),
                       (jnp.arange(start, stop), fields_L))

  def _remat(self, fn):
    """`fn` rematerialised by `model.remat` (itself where it is 'none')."""
    if self.cfg.remat == 'none':
      return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[self.cfg.remat])

  def _group(self, start, stop, x, apply, inputs_L):
    """Runs layers [start, stop): `apply(layer, x, inputs) -> (y, feats)` with each layer's
    slice of `inputs_L` (leading axis: the layers; None: no per-layer inputs), in one `lax.scan`
    over the stacked parameters (rematerialised by `model.remat`) or the layer itself for a
    group of one.
    Returns (output, [hidden per layer], {feature: [per layer]}).
    A layer run alone is rematerialised by the same policy, so `model.remat` means the same
    whether the layers are scanned or unrolled (and the unrolled twin that `aot` counts FLOPs
    and bytes on recomputes what the scanned program does)."""
    if stop - start == 1:
      graphdef, state = nnx.split(self.layers[start])

      def one(x, state, inputs):
        return apply(nnx.merge(graphdef, state), x, inputs)

      x, feats = self._remat(one)(x, state, jax.tree.map(lambda v: v[0], inputs_L))
      return x, [x], {k: [v] for k, v in feats.items()}
    graphdef, _ = nnx.split(self.layers[start])
    states = [nnx.split(self.layers[i])[1] for i in range(start, stop)]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *states)

    def body(x, inputs):
      state, layer_inputs = inputs
      y, feats = apply(nnx.merge(graphdef, state), x, layer_inputs)
      return y, (y, feats)

    x, (hidden_LBTD, feats_L) = jax.lax.scan(self._remat(body), x, (stacked, inputs_L))
    return x, list(hidden_LBTD), {k: list(v) for k, v in feats_L.items()}
