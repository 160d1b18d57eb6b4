"""One set of sizes for every layer, as Hugging Face configs require, without changing the function.

A Hugging Face config holds one FFN width, one head count and one KV-group count for all layers; an
exported sub-network may differ per layer. Padding makes them uniform exactly:
- FFN: extra columns of the first linear(s) and rows of the output linear are zero, so they add
  act(0) * 0 = 0.
- Heads: extra query heads have zero q and zero output rows, so they add nothing.
- KV groups: with r = gcd over layers of (heads / kv_groups), every layer is written with
  heads / r groups; a real group of `per = heads / kv_groups` query heads becomes per / r copies
  of itself, so query head n still reads its own group's keys and values (n // r in the copy ->
  n // per in the original). r = 1 (multi-head) for families without grouped-query attention.
- Attention width tied to the hidden size (GPT-2, BERT: head size = hidden / heads): the head
  count is padded to hidden / head_dim, which requires heads * head_dim <= hidden.
- Llama-family configs (explicit head size) still require the head count to divide the hidden
  size: heads are padded to the next count that does (in whole groups).
The padding's parameters are reported as stored minus real parameters.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from elastic_jax.config import ModelDims
from elastic_jax.errors import UserError

Params = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Shape:
  """Uniform sizes of a Hugging Face model."""

  hidden: int
  heads: int
  kv_groups: int
  head_dim: int
  ffn: int
  num_layers: int

  def dims(self) -> ModelDims:
    from elastic_jax.config import LayerDims
    layer = LayerDims(blocks=('transformer',), heads=self.heads, kv_groups=self.kv_groups,
                      ffn=self.ffn)
    return ModelDims(hidden=self.hidden, head_dim=self.head_dim, bottleneck_head_dim=0,
                     layers=(layer,) * self.num_layers)


def layer_key(i: int, rest: str) -> str:
  """The native (elastic_jax) parameter name of a transformer block's array."""
  return f'layers.{i}.blocks.transformer.{rest}'


def _pad(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return np.pad(x, pad)


def _heads_dividing(hidden: int, heads: int, ratio: int) -> tuple[int, int]:
  """The fewest heads >= `heads` that divide `hidden`, in whole groups of r | ratio heads
  (largest r first: fewer KV copies)."""
  for r in sorted((d for d in range(1, ratio + 1) if ratio % d == 0), reverse=True):
    for h in range(heads, hidden + 1):
      if hidden % h == 0 and h % r == 0:
        return h, r
  raise UserError(f'this sub-network has {heads} heads in a layer but hidden size {hidden}; '
                  'the Hugging Face config requires a head count dividing the hidden size: '
                  'choose a sub-network with hidden >= heads, or export with --format native')


def uniform(params: Params, dims: ModelDims, *, mha_only: bool, tied_width: bool,
            family: str, heads_divide_hidden: bool = False) -> tuple[Params, Shape]:
  """Pads a dense model's per-layer sizes to one `Shape` (see the module docstring)."""
  for i, layer in enumerate(dims.layers):
    if layer.blocks != ('transformer',):
      raise UserError(f'layer {i} of this sub-network is a {layer.blocks[0]} block, which no '
                      f'Hugging Face {family} class can express; export it with --format native')
  hd = dims.head_dim
  # A sub-network may remove every layer (embeddings -> head): written with 0 layers.
  heads = max((l.heads for l in dims.layers), default=1)
  if tied_width and not dims.layers:
    heads = 1 if dims.hidden % hd else dims.hidden // hd  # no attention: any valid head count
  elif tied_width:
    too_wide = [i for i, l in enumerate(dims.layers) if l.heads * hd > dims.hidden]
    if dims.hidden % hd or too_wide:
      raise UserError(
          f'{family} ties the attention width to the hidden size (head size = hidden / heads), '
          f'but this sub-network has hidden {dims.hidden} and head size {hd} with '
          f'{heads} heads in layer(s) {too_wide or "all"}; choose '
          'one whose heads x head size <= hidden with head size dividing hidden, or export '
          'with --format native')
    heads = dims.hidden // hd
  ratio = 1 if mha_only or not dims.layers else math.gcd(*(l.heads // l.kv_groups
                                                             for l in dims.layers))
  if heads % ratio:  # only when tied_width padded the heads; fall back to multi-head
    ratio = 1
  if heads_divide_hidden and dims.layers:  # transformers validates hidden % heads == 0
    heads, ratio = _heads_dividing(dims.hidden, heads, ratio)
  groups = heads // ratio
  ffn = max((l.ffn for l in dims.layers), default=1)
  out = {k: v for k, v in params.items() if not k.startswith('layers.')}
  for i, layer in enumerate(dims.layers):
    get = lambda rest, i=i: params[layer_key(i, rest)]
    put = lambda rest, v, i=i: out.__setitem__(layer_key(i, rest), v)
    for rest in ('norm1.scale', 'norm1.bias', 'norm2.scale', 'norm2.bias', 'attn.o_bias',
                 'mlp.down_bias'):
      if layer_key(i, rest) in params:
        put(rest, get(rest))
    put('attn.q', _pad(get('attn.q'), 1, heads))
    put('attn.o', _pad(get('attn.o'), 0, heads))
    if layer_key(i, 'attn.q_bias') in params:
      put('attn.q_bias', _pad(get('attn.q_bias'), 0, heads))
    # Group j of the uniform layout copies real group (j * ratio) // per; groups past the
    # layer's own heads / ratio are zero (only padded query heads read them).
    per = layer.heads // layer.kv_groups
    used = layer.heads // ratio
    source = (np.arange(groups) * ratio) // per
    keep = (np.arange(groups) < used).astype(np.float32)
    for name, axis in (('attn.k', 1), ('attn.v', 1), ('attn.k_bias', 0), ('attn.v_bias', 0)):
      if layer_key(i, name) in params:
        x = np.take(get(name), np.minimum(source, layer.kv_groups - 1), axis=axis)
        put(name, x * np.expand_dims(keep, [a for a in range(x.ndim) if a != axis]))
    for name in ('mlp.up', 'mlp.gate'):
      if layer_key(i, name) in params:
        put(name, _pad(get(name), 1, ffn))
    for name in ('mlp.up_bias', 'mlp.gate_bias'):
      if layer_key(i, name) in params:
        put(name, _pad(get(name), 0, ffn))
    put('mlp.down', _pad(get('mlp.down'), 0, ffn))
  return out, Shape(hidden=dims.hidden, heads=heads, kv_groups=groups, head_dim=hd, ffn=ffn,
                    num_layers=len(dims.layers))


def count(params: Params) -> int:
  return int(sum(v.size for v in params.values()))
