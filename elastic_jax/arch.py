"""An architecture is data: a small pytree of int32 arrays, and its JSON form.

Fields (L = space.num_layers; every layer has values even when it is off, so shapes never change):
  hidden     int32[]   active hidden size (global)
  depth      int32[]   layers [0, depth) are kept; later layers are removed
  head_dim   int32[]   head size of transformer blocks (global)
  block      int32[L]  index into config.BLOCK_TYPES ('transformer', 'bottleneck', 'skip')
  heads      int32[L]  active query heads
  kv_groups  int32[L]  active key/value groups; divides heads
  ffn        int32[L]  active FFN width
  inner      int32[L]  bottleneck inner width (0 when the space has no bottleneck block)
  ffn_layers int32[L]  stacked FFN linears of a FlexiBERT block (1 elsewhere)
  fgrams     int32[]   SCONE: f-grams used, a prefix of the frequency order (0: no SCONE
                       dimension in the space, i.e. all of them)
  fgram_layers int32[] SCONE: f-gram model blocks kept, a prefix (0: all)
  fgram_ffn  int32[]   SCONE: the f-gram model's active FFN width, a prefix (0: all)

A layer is on when it lies within `depth` and its block is not 'skip'. Because an arch only ever
enters a jitted function as arrays of these fixed shapes, changing it never retraces.

JSON form (what `sample` prints and `export --arch` reads):
  {"hidden": 256, "depth": 4, "head_dim": 32,
   "layers": [{"block": "transformer", "heads": 4, "kv_groups": 4, "ffn": 512, "inner": 0}, ...]}
A layer may also carry "ffn_layers" (FlexiBERT blocks); absent means 1, and it is written only
when it is not 1, so archs of spaces without stacked FFNs keep their JSON form. Likewise
"fgrams", "fgram_layers", "fgram_ffn" appear only in archs of a SCONE space (where they are
required).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from elastic_jax.config import BLOCK_TYPES, SKIP, SpaceConfig
from elastic_jax.errors import UserError

LAYER_FIELDS = ('block', 'heads', 'kv_groups', 'ffn', 'inner')
OPTIONAL_LAYER_FIELDS = {'ffn_layers': 1}
GLOBAL_FIELDS = ('hidden', 'depth', 'head_dim')
SCONE_FIELDS = ('fgrams', 'fgram_layers', 'fgram_ffn')


@struct.dataclass
class Arch:
  hidden: jax.Array
  depth: jax.Array
  head_dim: jax.Array
  block: jax.Array
  heads: jax.Array
  kv_groups: jax.Array
  ffn: jax.Array
  inner: jax.Array
  ffn_layers: jax.Array
  fgrams: jax.Array
  fgram_layers: jax.Array
  fgram_ffn: jax.Array

  def layer_on(self) -> jax.Array:
    """bool[L]: which layers compute something (NumPy for a concrete arch: host code)."""
    xp = np if is_concrete(self) else jnp
    num_layers = self.block.shape[-1]
    depth = xp.asarray(self.depth)
    return (xp.arange(num_layers) < depth[..., None]) & (xp.asarray(self.block) != SKIP)


def is_concrete(tree) -> bool:
  """Whether `tree` holds no tracer: a call from host code, outside any jit, vmap or grad."""
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def host_jit(fn=None, /, *, static_argnames: tuple[str, ...] = ()):
  """Decorator of a jittable function: called from host code (no tracer among its non-static
  arguments, `is_concrete`), it runs as one compiled program, `jax.jit(fn, static_argnames)`
  made once (a `Space` argument is static and equal by its key, so equal spaces share it);
  called traced (inside jit, vmap or grad), it runs inline. Run op by op instead, every primitive
  compiled a program of its own: tens per call, seconds at a command's start."""
  if fn is None:
    return functools.partial(host_jit, static_argnames=static_argnames)
  compiled = jax.jit(fn, static_argnames=static_argnames)
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    named = signature.bind(*args, **kwargs).arguments
    dynamic = [v for k, v in named.items() if k not in static_argnames]
    return (compiled if is_concrete(dynamic) else fn)(*args, **kwargs)

  return call


def stack(archs: Sequence[Arch]) -> Arch:
  """A batch of archs (leading axis) for `jax.vmap`."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *archs)


def unstack(archs: Arch) -> list[Arch]:
  n = archs.hidden.shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], archs) for i in range(n)]


def to_json(arch: Arch) -> dict:
  a = jax.tree.map(np.asarray, arch)
  layers = []
  for i in range(a.block.shape[0]):
    layer = {'block': BLOCK_TYPES[int(a.block[i])], 'heads': int(a.heads[i]),
             'kv_groups': int(a.kv_groups[i]), 'ffn': int(a.ffn[i]), 'inner': int(a.inner[i])}
    if int(a.ffn_layers[i]) != 1:
      layer['ffn_layers'] = int(a.ffn_layers[i])
    layers.append(layer)
  out = {'hidden': int(a.hidden), 'depth': int(a.depth), 'head_dim': int(a.head_dim),
         'layers': layers}
  if int(a.fgrams):
    out.update({f: int(getattr(a, f)) for f in SCONE_FIELDS})
  return out


def _check(field: str, value, allowed: Sequence) -> None:
  if value not in allowed:
    raise UserError(f'architecture field {field}={value!r} is outside the search space; '
                    f'allowed values: {list(allowed)}')


def from_json(d: Mapping, space: SpaceConfig) -> Arch:
  """Validates a JSON arch against the space and returns the int32 pytree."""
  if not isinstance(d, Mapping):
    raise UserError(f'an architecture must be a JSON object, got {type(d).__name__}')
  missing = [f for f in GLOBAL_FIELDS + ('layers',) if f not in d]
  if missing:
    raise UserError(f'architecture is missing field(s) {missing}; expected {GLOBAL_FIELDS} and '
                    "'layers' (see `elastic-jax sample` for the format)")
  scone = SCONE_FIELDS if space.scone else ()
  missing = [f for f in scone if f not in d]
  extra = [f for f in SCONE_FIELDS if f in d and not scone]
  if missing or extra:
    raise UserError(f'architecture field(s) {missing or extra} '
                    + ('missing: a SCONE space (scone.enabled) needs them'
                       if missing else 'belong to a SCONE space; this one has none (scone.enabled '
                       'is off)'))
  for f in GLOBAL_FIELDS + scone:
    if not isinstance(d[f], int):
      raise UserError(f'architecture field {f}={d[f]!r} must be an integer')
  _check('hidden', d['hidden'], space.hidden)
  _check('depth', d['depth'], space.depth)
  _check('head_dim', d['head_dim'], space.head_dim)
  for f in scone:
    _check(f, d[f], getattr(space, f))
  layers = d['layers']
  if not isinstance(layers, list) or len(layers) != space.num_layers:
    got = len(layers) if isinstance(layers, list) else type(layers).__name__
    raise UserError(f'architecture field layers must list {space.num_layers} layers '
                    f'(space.num_layers), got {got}')
  values = {f: [] for f in LAYER_FIELDS + tuple(OPTIONAL_LAYER_FIELDS)}
  for i, layer in enumerate(layers):
    if not isinstance(layer, Mapping):
      raise UserError(f'architecture field layers[{i}] must be an object')
    extra = sorted(set(layer) - set(LAYER_FIELDS) - set(OPTIONAL_LAYER_FIELDS))
    if extra or any(f not in layer for f in LAYER_FIELDS):
      raise UserError(f'architecture field layers[{i}] must have exactly the fields '
                      f'{list(LAYER_FIELDS)} (and optionally {list(OPTIONAL_LAYER_FIELDS)}), '
                      f'got {sorted(layer)}')
    layer = {**OPTIONAL_LAYER_FIELDS, **layer}
    _check(f'layers[{i}].block', layer['block'], space.blocks)
    _check(f'layers[{i}].heads', layer['heads'], space.heads)
    kv_allowed = space.kv_groups or (layer['heads'],)
    _check(f'layers[{i}].kv_groups', layer['kv_groups'], kv_allowed)
    if layer['heads'] % layer['kv_groups']:
      raise UserError(f'architecture field layers[{i}].kv_groups={layer["kv_groups"]} does not '
                      f'divide layers[{i}].heads={layer["heads"]}')
    _check(f'layers[{i}].ffn', layer['ffn'], space.ffn)
    _check(f'layers[{i}].inner', layer['inner'], space.inner or (0,))
    _check(f'layers[{i}].ffn_layers', layer['ffn_layers'], space.ffn_layers)
    b = space.blocks.index(layer['block'])
    if space.ffn_max and layer['ffn'] > space.ffn_max[i][b]:
      raise UserError(f'architecture field layers[{i}].ffn={layer["ffn"]} is outside the search '
                      f'space: layer {i} allows {layer["block"]} FFN widths up to '
                      f'{space.ffn_max[i][b]} (space.ffn_max)')
    if space.heads_allowed:
      _check(f'layers[{i}].heads', layer['heads'], space.heads_allowed[i][b])
    values['block'].append(BLOCK_TYPES.index(layer['block']))
    for f in LAYER_FIELDS[1:] + tuple(OPTIONAL_LAYER_FIELDS):
      values[f].append(layer[f])
  return Arch(hidden=jnp.int32(d['hidden']), depth=jnp.int32(d['depth']),
              head_dim=jnp.int32(d['head_dim']),
              **{f: jnp.asarray(v, jnp.int32) for f, v in values.items()},
              **{f: jnp.int32(d[f] if scone else 0) for f in SCONE_FIELDS})


def _read_json_archs(path: str | Path) -> list:
  """The JSON archs of a file: one object, a list of them, or JSON lines (one per line, as
  `elastic-jax sample` prints them)."""
  path = Path(path)
  if path.is_dir():
    raise UserError(f'architecture file {path} is a directory; pass a JSON file written by '
                    '`elastic-jax sample --config C --n 1 > arch.json`, or largest / smallest')
  if not path.is_file():
    raise UserError(f'architecture file {path} does not exist; write one with '
                    '`elastic-jax sample --config C --n 1 > arch.json`, or pass largest / '
                    'smallest')
  text = path.read_text().strip()
  try:
    try:
      d = json.loads(text)
      archs = d if isinstance(d, list) else [d]
    except json.JSONDecodeError:
      archs = [json.loads(line) for line in text.splitlines() if line.strip()]
  except json.JSONDecodeError as e:
    raise UserError(f'architecture file {path} is not valid JSON ({e}); expected the format '
                    'printed by `elastic-jax sample`') from None
  if not archs:
    raise UserError(f'architecture file {path} holds no architecture')
  return archs


def load(path: str | Path, space: SpaceConfig) -> Arch:
  """Reads one arch from a JSON file (or the first line of a JSON-lines file)."""
  return from_json(_read_json_archs(path)[0], space)


def load_all(path: str | Path, space: SpaceConfig) -> list[Arch]:
  """Every arch of a JSON file (one object or a list) or JSON-lines file, validated."""
  out = []
  for i, d in enumerate(_read_json_archs(path)):
    try:
      out.append(from_json(d, space))
    except UserError as e:
      raise UserError(f'{path}, architecture {i + 1}: {e}') from None
  return out


def dumps(arch: Arch) -> str:
  return json.dumps(to_json(arch))
