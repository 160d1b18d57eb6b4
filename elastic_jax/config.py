"""Typed, frozen, validated configs built once from the ml-collections `ConfigDict`s in `configs/`.

The command line and the experiment files speak `ConfigDict`; the library speaks the frozen
dataclasses below. Each is validated in `__post_init__` so a bad value fails once, early, with a
message naming the config field, the value and what is allowed.

Three layers:
- `ModelConfig`: the model *family* (encoder or decoder, norms, positions, MLP, embeddings, dtypes).
  It is shared by the supernet and by every exported dense model.
- `SpaceConfig`: the elastic search space, as data: the allowed values of every elastic dimension.
- `ModelDims`: concrete array sizes of one model: the supernet's maxima, or one exported
  sub-network's per-layer sizes.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from elastic_jax.errors import UserError

# Block types, in registry order: the arch stores a block's index in this tuple, so new types are
# appended, never inserted. 'skip' is the identity (a removed layer). The last six are FlexiBERT's
# operations (`elastic_jax/model/flexibert.py`): self-attention with scaled dot-product or weighted
# multiplicative scores, Fourier or cosine transforms along the sequence, dynamic convolution with
# kernel 5 or 9.
BLOCK_TYPES = ('transformer', 'bottleneck', 'skip', 'sa_sdp', 'sa_wma', 'lt_dft', 'lt_dct',
               'dsc_5', 'dsc_9')
SKIP = BLOCK_TYPES.index('skip')
FLEXIBERT_BLOCKS = BLOCK_TYPES[3:]

_KINDS = ('encoder', 'decoder')
_POSITIONS = ('learned', 'rotary', 'none')
_NORMS = ('layernorm', 'rmsnorm', 'nonorm')
_PLACEMENTS = ('pre', 'post')
_MLPS = ('gelu', 'gelu_tanh', 'relu', 'swiglu')
_DTYPES = ('float32', 'bfloat16', 'float16', 'float64')
_REMATS = ('none', 'dots_saveable', 'full')
_ATTENTIONS = ('einsum', 'splash', 'splash_interpret')


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise UserError(f'config field {field}={value!r} is invalid: {allowed}')


def _one_of(field: str, value: Any, choices: Sequence[Any]) -> None:
  _require(value in choices, field, value, f'allowed values are {list(choices)}')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model family. Every knob exists so BERT-, GPT-2- and Llama-style checkpoints fit."""

  kind: str = 'decoder'  # 'encoder' (bidirectional, MLM head) | 'decoder' (causal LM head)
  vocab_size: int = 262
  max_len: int = 256  # longest sequence; size of the learned position table
  positions: str = 'learned'  # 'learned' | 'rotary' (interleaved pairs) | 'none'
  rope_theta: float = 10000.0
  norm: str = 'layernorm'  # 'layernorm' | 'rmsnorm' | 'nonorm' (MobileBERT's elementwise affine)
  norm_placement: str = 'pre'  # 'pre' (GPT-2, Llama) | 'post' (BERT)
  norm_eps: float = 1e-5
  mlp: str = 'gelu'  # 'gelu' (exact) | 'gelu_tanh' (GPT-2's tanh form) | 'relu' | 'swiglu'
  tie_embeddings: bool = True
  embed_dim: int = 0  # factorised embedding width E < hidden (ALBERT/MobileBERT); 0 = no factor
  use_bias: bool = True  # biases of linear layers and norms
  qkv_bias: bool = False  # q/k/v projections carry biases even when use_bias is False (Qwen2)
  output_bias: bool = False  # a bias on the vocabulary logits (BERT's decoder has one)
  head_transform: bool = False  # BERT's MLM head: dense -> act -> norm before the vocab projection
  type_vocab_size: int = 0  # BERT token-type (segment A/B) embeddings; 0 = none
  pooler: bool = False  # BERT's pooler (dense + tanh on the first token); not used by the LM loss
  init_std: float = 0.02
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'
  # The masked supernet runs each run of structurally identical layers as one `lax.scan` over their
  # stacked parameters: compile time and program size stop growing with depth. Exact either way.
  scan_layers: bool = True
  # Rematerialisation of each layer (scanned or not) in the backward pass: 'none' keeps every
  # activation; 'dots_saveable' keeps only matmul outputs; 'full' recomputes each layer from its
  # input.
  remat: str = 'none'
  # How softmax attention runs: 'einsum' (matmuls, the [B, N, T, S] scores in memory: any backend,
  # exact reference, the only one that can capture attention probabilities or read a KV cache);
  # 'splash' (in programs for TPU, the Pallas splash kernel: no scores in HBM; sequence lengths
  # multiples of 128; 'einsum' on other platforms); 'splash_interpret' (that kernel in the Pallas
  # interpreter, any backend: tests). Where the kernel cannot serve a call (probabilities
  # captured, a KV cache), 'einsum' serves it.
  attention: str = 'einsum'
  # Masked sub-networks skip the query-head blocks and FFN column blocks past their active sizes
  # (blocks cut at the space's choices; a `lax.cond` each), so a narrow sub-network does not
  # compute its inactive units. False: one block each, the inactive units computed and masked
  # (no conditionals: fewer, larger fusions; XLA's cost analysis charges a conditional its
  # costliest branch anyway: bench/results/aot_ablation.md). Exact either way.
  skip_width_blocks: bool = True

  def __post_init__(self):
    _one_of('model.kind', self.kind, _KINDS)
    _one_of('model.remat', self.remat, _REMATS)
    _one_of('model.attention', self.attention, _ATTENTIONS)
    _one_of('model.positions', self.positions, _POSITIONS)
    _one_of('model.norm', self.norm, _NORMS)
    _one_of('model.norm_placement', self.norm_placement, _PLACEMENTS)
    _one_of('model.mlp', self.mlp, _MLPS)
    _one_of('model.dtype', self.dtype, _DTYPES)
    _one_of('model.param_dtype', self.param_dtype, _DTYPES)
    if 'float64' in (self.dtype, self.param_dtype):
      import jax  # noqa: PLC0415 (only float64 configs need it)
      field = 'model.dtype' if self.dtype == 'float64' else 'model.param_dtype'
      _require(jax.config.jax_enable_x64, field, 'float64',
               'float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 (or use float32)')
    _require(self.vocab_size > 0, 'model.vocab_size', self.vocab_size, 'must be positive')
    _require(self.max_len > 0, 'model.max_len', self.max_len, 'must be positive')
    _require(self.embed_dim >= 0, 'model.embed_dim', self.embed_dim, 'must be >= 0 (0 = none)')
    _require(self.type_vocab_size >= 0, 'model.type_vocab_size', self.type_vocab_size,
             'must be >= 0')
    _require(self.norm_eps > 0, 'model.norm_eps', self.norm_eps, 'must be positive')

  @property
  def causal(self) -> bool:
    return self.kind == 'decoder'

  @property
  def factorised(self) -> bool:
    return self.embed_dim > 0

  @property
  def attn_qkv_bias(self) -> bool:
    return self.use_bias or self.qkv_bias


@dataclasses.dataclass(frozen=True)
class LayerDims:
  """Array sizes of one layer. `blocks` lists the block types whose weights the layer holds."""

  blocks: tuple[str, ...]
  heads: int
  kv_groups: int
  ffn: int
  inner: int = 0  # bottleneck inner width; 0 when the layer has no bottleneck block
  # FFN column blocks a masked model may skip (the space's FFN choices); () in dense models.
  ffn_segments: tuple[int, ...] = ()
  # Query-head blocks a masked model may skip (the space's head-count choices); () in dense models.
  head_segments: tuple[int, ...] = ()
  ffn_layers: int = 1  # stacked FFN linears of FlexiBERT blocks (the supernet: the most allowed)
  # Query heads per KV group shared by every architecture a masked model runs (1: multi-head
  # attention), so attention reads the groups without a gather; 0: it varies, or a dense model
  # (whose ratio is heads / kv_groups).
  kv_ratio: int = 0


@dataclasses.dataclass(frozen=True)
class ModelDims:
  """Array sizes of a whole model: the supernet's maxima or an exported sub-network's own."""

  hidden: int
  head_dim: int
  bottleneck_head_dim: int
  layers: tuple[LayerDims, ...]

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Mapping) -> ModelDims:
    layers = tuple(LayerDims(**{**l, 'blocks': tuple(l['blocks']),
                                'ffn_segments': tuple(l.get('ffn_segments', ())),
                                'head_segments': tuple(l.get('head_segments', ()))})
                   for l in d['layers'])
    return cls(hidden=d['hidden'], head_dim=d['head_dim'],
               bottleneck_head_dim=d['bottleneck_head_dim'], layers=layers)


def _choices(field: str, values: Sequence[int], *, allow_empty: bool = False) -> tuple[int, ...]:
  if isinstance(values, (str, bytes)) or not hasattr(values, '__iter__'):
    values = (values,)  # e.g. --config.space.hidden=abc, or one number
  values = tuple(values)
  _require(all(isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer()
               for v in values), field, list(values), 'choices must be whole numbers')
  values = tuple(int(v) for v in values)
  if not values and allow_empty:
    return values
  _require(len(values) > 0, field, list(values), 'needs at least one choice')
  _require(all(v > 0 for v in values), field, list(values), 'every choice must be positive')
  _require(len(set(values)) == len(values), field, list(values), 'choices must be distinct')
  return tuple(sorted(values))


@dataclasses.dataclass(frozen=True)
class SpaceConfig:
  """The elastic search space: allowed values per elastic dimension (the same for every layer).

  Arbitrary layer subsets come from allowing the 'skip' block; prefix depth from `depth`.
  """

  num_layers: int
  hidden: tuple[int, ...]  # global hidden size choices
  depth: tuple[int, ...]  # number of leading layers kept (a prefix); the rest are removed
  blocks: tuple[str, ...]  # allowed block types per layer, from BLOCK_TYPES
  heads: tuple[int, ...]  # query heads per layer
  kv_groups: tuple[int, ...]  # key/value groups per layer (GQA); () = multi-head (groups = heads)
  head_dim: tuple[int, ...]  # global head size choices of transformer blocks
  ffn: tuple[int, ...]  # FFN width per layer (both block types)
  inner: tuple[int, ...]  # bottleneck inner width per layer; () when no bottleneck block
  bottleneck_head_dim: int  # head size inside bottleneck blocks (not elastic)
  # Stacked FFN linears per layer of FlexiBERT blocks (FlexiBERT's num_feed_forward); other blocks
  # have one FFN and ignore it.
  ffn_layers: tuple[int, ...] = (1,)
  # Per-layer limits inside the choice lists (ELM's dynamic modules, elastic_jax/train/dynamic/):
  # per layer, per entry of `blocks`, the largest allowed FFN width and the allowed head counts.
  # () = every choice is allowed everywhere. The arrays stay at the choice lists' maxima.
  ffn_max: tuple[tuple[int, ...], ...] = ()
  heads_allowed: tuple[tuple[tuple[int, ...], ...], ...] = ()
  # SCONE's elastic dimensions (elastic_jax/scone), () without SCONE: the number of f-grams used
  # (a prefix of the frequency order) and the f-gram model's depth and FFN width (prefixes of
  # the `scone` section's maxima). A SCONE run's space always has them (one choice each unless
  # the config lists more; `scone.config.with_scone_choices` fills and checks them). In an arch,
  # 0 stands for "the whole": all f-grams, the full f-gram model.
  fgrams: tuple[int, ...] = ()
  fgram_layers: tuple[int, ...] = ()
  fgram_ffn: tuple[int, ...] = ()

  def __post_init__(self):
    _require(self.num_layers > 0, 'space.num_layers', self.num_layers, 'must be positive')
    for b in self.blocks:
      _one_of('space.blocks', b, BLOCK_TYPES)
    _require(len(self.blocks) > 0, 'space.blocks', list(self.blocks), 'needs at least one type')
    _require(any(b != 'skip' for b in self.blocks), 'space.blocks', list(self.blocks),
             "needs a block type other than 'skip'")
    _require(max(self.depth) <= self.num_layers, 'space.depth', list(self.depth),
             f'choices must be <= space.num_layers={self.num_layers}')
    _require(self.bottleneck_head_dim > 0 or 'bottleneck' not in self.blocks,
             'space.bottleneck_head_dim', self.bottleneck_head_dim, 'must be positive')
    _require(bool(self.inner) or 'bottleneck' not in self.blocks, 'space.inner',
             list(self.inner), "needs choices when 'bottleneck' is an allowed block")
    for h in self.heads:
      _require(not self.kv_groups or any(h % g == 0 for g in self.kv_groups), 'space.kv_groups',
               list(self.kv_groups), f'no choice divides the head count {h} of space.heads')
    if any(b in FLEXIBERT_BLOCKS for b in self.blocks):
      _check_flexibert(self)
    _check_limits(self)

  @property
  def scone(self) -> bool:
    """Whether the space has SCONE's f-gram dimensions."""
    return bool(self.fgrams)

  @property
  def flexibert(self) -> bool:
    return any(b in FLEXIBERT_BLOCKS for b in self.blocks)

  @property
  def kinds(self) -> tuple[str, ...]:
    """Block types that own weights."""
    return tuple(b for b in self.blocks if b != 'skip')

  @property
  def max_kv_groups(self) -> int:
    return max(self.kv_groups) if self.kv_groups else max(self.heads)

  @property
  def kv_ratio(self) -> int:
    """Query heads per KV group when every architecture of the space has the same ratio (1 for
    multi-head attention), else 0."""
    ratios = {h // g for h in self.heads for g in (self.kv_groups or (h,)) if h % g == 0}
    return ratios.pop() if len(ratios) == 1 else 0

  def supernet_dims(self) -> ModelDims:
    kinds = self.kinds
    layer = LayerDims(blocks=kinds, heads=max(self.heads), kv_groups=self.max_kv_groups,
                      ffn=max(self.ffn),
                      inner=max(self.inner) if 'bottleneck' in kinds else 0,
                      ffn_segments=self.ffn, head_segments=self.heads,
                      ffn_layers=max(self.ffn_layers), kv_ratio=self.kv_ratio)
    return ModelDims(hidden=max(self.hidden), head_dim=max(self.head_dim),
                     bottleneck_head_dim=self.bottleneck_head_dim if 'bottleneck' in kinds else 0,
                     layers=(layer,) * self.num_layers)


def _check_limits(space: SpaceConfig) -> None:
  """`ffn_max` and `heads_allowed` give, per layer and per block type, a value (a subset) of the
  choice lists."""
  shape = f'{space.num_layers} layers x {len(space.blocks)} block types (space.blocks)'
  if space.ffn_max:
    ok = (len(space.ffn_max) == space.num_layers
          and all(len(row) == len(space.blocks) for row in space.ffn_max)
          and all(v in space.ffn for row in space.ffn_max for v in row))
    _require(ok, 'space.ffn_max', [list(r) for r in space.ffn_max],
             f'needs {shape} widths from space.ffn={list(space.ffn)}')
  if space.heads_allowed:
    ok = (len(space.heads_allowed) == space.num_layers
          and all(len(row) == len(space.blocks) for row in space.heads_allowed)
          and all(hs and set(hs) <= set(space.heads) for row in space.heads_allowed
                  for hs in row))
    _require(ok, 'space.heads_allowed', [[list(h) for h in r] for r in space.heads_allowed],
             f'needs {shape} non-empty subsets of space.heads={list(space.heads)}')


def _check_flexibert(space: SpaceConfig) -> None:
  """FlexiBERT blocks split the hidden size into `heads` heads of size hidden / heads (dynamic
  convolution: heads / 2 attention and heads / 2 convolution heads), and have no GQA."""
  for h in space.heads:
    for d in space.hidden:
      _require(d % h == 0, 'space.heads', list(space.heads),
               f'FlexiBERT blocks need every head count to divide every hidden size ({d} % {h})')
    if any(b.startswith('dsc') for b in space.blocks):
      _require(h % 2 == 0, 'space.heads', list(space.heads),
               'dynamic convolution blocks (dsc_5, dsc_9) need even head counts')
  _require(not space.kv_groups, 'space.kv_groups', list(space.kv_groups),
           'FlexiBERT blocks have no grouped-query attention: leave it empty')
  _require(all(1 <= n <= 8 for n in space.ffn_layers), 'space.ffn_layers',
           list(space.ffn_layers), 'choices must lie in 1..8')


def check_known_fields(section: str, values, known) -> None:
  """One line naming the fields of config section `section` that are not in `known`."""
  unknown = sorted(set(values) - set(known))
  if unknown:
    names = ', '.join(f'{section}.{name}' for name in unknown)
    raise UserError(f'unknown config field(s) {names}; known fields: {sorted(known)}')


def model_config(cfg: Mapping) -> ModelConfig:
  """Builds the typed model family config from the `model` section of a ConfigDict."""
  values = dict(cfg)
  check_known_fields('model', values, {f.name for f in dataclasses.fields(ModelConfig)})
  return ModelConfig(**values)


def space_config(cfg: Mapping) -> SpaceConfig:
  """Builds the typed search space from the `space` section of a ConfigDict.

  `head_dim` may be empty: then it is hidden // heads of the largest model, which requires the
  largest head count to divide the largest hidden size.
  """
  check_known_fields('space', cfg, {f.name for f in dataclasses.fields(SpaceConfig)})
  missing = [f for f in ('num_layers', 'hidden', 'heads', 'ffn') if f not in cfg]  # no default
  if missing:
    raise UserError(f'config field space.{missing[0]} is missing: every space section sets it '
                    '(configs/quickstart.py shows one; a workdir\'s config.json holds every '
                    'field its run used)')
  hidden = _choices('space.hidden', cfg['hidden'])
  heads = _choices('space.heads', cfg['heads'])
  head_dim = _choices('space.head_dim', cfg.get('head_dim', ()), allow_empty=True)
  if not head_dim:
    if max(hidden) % max(heads):
      raise UserError(f'config field space.heads={list(heads)} is invalid: the largest head count '
                      f'{max(heads)} does not divide the largest hidden size {max(hidden)}; '
                      'change space.heads or space.hidden, or set space.head_dim explicitly')
    head_dim = (max(hidden) // max(heads),)
  inner = _choices('space.inner', cfg.get('inner', ()), allow_empty=True)
  blocks = tuple(cfg.get('blocks', ('transformer',)))
  bottleneck_head_dim = int(cfg.get('bottleneck_head_dim', 0))
  if 'bottleneck' in blocks and not bottleneck_head_dim and inner:
    if max(inner) % max(heads):
      raise UserError(f'config field space.inner={list(inner)} is invalid: the largest head '
                      f'count {max(heads)} does not divide the largest inner width {max(inner)}; '
                      'set space.bottleneck_head_dim explicitly')
    bottleneck_head_dim = max(inner) // max(heads)
  num_layers = int(cfg['num_layers'])
  ffn_layers = _choices('space.ffn_layers', cfg.get('ffn_layers', ()) or (1,))
  if ffn_layers != (1,) and not any(b in FLEXIBERT_BLOCKS for b in blocks):
    raise UserError(f'config field space.ffn_layers={list(ffn_layers)} is invalid: only FlexiBERT '
                    f'blocks {list(FLEXIBERT_BLOCKS)} stack FFN layers; use (1,)')
  return SpaceConfig(
      num_layers=num_layers,
      hidden=hidden,
      depth=_choices('space.depth', cfg.get('depth', ()) or (num_layers,)),
      blocks=blocks,
      heads=heads,
      kv_groups=_choices('space.kv_groups', cfg.get('kv_groups', ()), allow_empty=True),
      head_dim=head_dim,
      ffn=_choices('space.ffn', cfg['ffn']),
      inner=inner,
      bottleneck_head_dim=bottleneck_head_dim,
      ffn_layers=ffn_layers,
      ffn_max=tuple(tuple(int(v) for v in row) for row in cfg.get('ffn_max', ())),
      heads_allowed=tuple(tuple(tuple(sorted(int(h) for h in hs)) for hs in row)
                          for row in cfg.get('heads_allowed', ())),
      **{f: _choices(f'space.{f}', cfg.get(f, ()), allow_empty=True)
         for f in ('fgrams', 'fgram_layers', 'fgram_ffn')},
  )


def check_compatible(model: ModelConfig, space: SpaceConfig) -> None:
  """Cross-section checks between the family and the space."""
  if model.positions == 'rotary':
    for d in space.head_dim + ((space.bottleneck_head_dim,) if 'bottleneck' in space.blocks
                               else ()):
      if d % 2:
        raise UserError(f'rotary positions need even head sizes; got {d} (space.head_dim / '
                        'space.bottleneck_head_dim): choose even sizes or model.positions=learned')
  if model.factorised and model.embed_dim > max(space.hidden):
    raise UserError(f'config field model.embed_dim={model.embed_dim} is invalid: a factorised '
                    f'embedding must be narrower than the largest hidden size {max(space.hidden)}')
  if space.flexibert:
    # The sequence transforms and convolutions read every position (as FlexiBERT does), so they
    # would see the future in a decoder; the reference blocks are post-norm ELECTRA layers.
    if model.kind != 'encoder' or model.norm_placement != 'post' or model.mlp == 'swiglu':
      raise UserError('FlexiBERT blocks (space.blocks) need model.kind=encoder, '
                      "model.norm_placement=post and model.mlp 'gelu' or 'relu' (ELECTRA layers); "
                      f'got {model.kind}, {model.norm_placement}, {model.mlp}')
  if model.kind == 'decoder' and model.type_vocab_size:
    raise UserError('config field model.type_vocab_size must be 0 for a decoder (token types are '
                    'an encoder feature)')
