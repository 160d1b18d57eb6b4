"""Export a sub-network as an ordinary dense model, and save / load dense models.

Because every elastic dimension is a prefix of every array axis, exporting is slicing: the dense
model's layer i is the supernet's i-th *active* layer, holding only the chosen block type, and each
of its arrays is the leading block of the supernet's array. The dense model is the same `Model`
class built with its own (smaller, per-layer) sizes and called with `arch=None`: no masks, smaller
matmuls, real speedups.

On disk: `config.json` (model family, sizes, source arch) + `model.safetensors` (never pickle).
Writes go to a temporary directory renamed into place, so a failed export leaves nothing behind;
an existing path is replaced only when it is an earlier export and the caller allows it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from elastic_jax import __version__, atomic
from elastic_jax import arch as arch_lib
from elastic_jax.arch import Arch
from elastic_jax.config import (
    BLOCK_TYPES,
    FLEXIBERT_BLOCKS,
    LayerDims,
    ModelConfig,
    ModelDims,
    SpaceConfig,
)
from elastic_jax.errors import UserError, read_json
from elastic_jax.model import layers
from elastic_jax.model.supernet import Model

FORMAT = 'elastic_jax.dense/1'
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
ARCH_FILE = 'arch.json'


def dense_dims(space: SpaceConfig, arch: Arch) -> tuple[ModelDims, list[int]]:
  """Sizes of the dense model an arch exports to, and the supernet layer index of each layer."""
  a = jax.tree.map(np.asarray, arch)
  on = np.asarray(arch.layer_on())
  layers, source = [], []
  for i in np.flatnonzero(on):
    kind = BLOCK_TYPES[int(a.block[i])]
    layers.append(LayerDims(blocks=(kind,), heads=int(a.heads[i]), kv_groups=int(a.kv_groups[i]),
                            ffn=int(a.ffn[i]),
                            inner=int(a.inner[i]) if kind == 'bottleneck' else 0,
                            ffn_layers=int(a.ffn_layers[i]) if kind in FLEXIBERT_BLOCKS else 1))
    source.append(int(i))
  has_bottleneck = any(l.blocks == ('bottleneck',) for l in layers)
  dims = ModelDims(hidden=int(a.hidden), head_dim=int(a.head_dim),
                   bottleneck_head_dim=space.bottleneck_head_dim if has_bottleneck else 0,
                   layers=tuple(layers))
  return dims, source


def flat_params(model: nnx.Module) -> dict[tuple, jax.Array]:
  return {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def abstract_model(cfg: ModelConfig, dims: ModelDims) -> Model:
  """The model of `dims` with shapes-only parameters (`fill_model` gives them values)."""
  with layers.abstract_params():
    return Model(cfg, dims, rngs=nnx.Rngs(0))


def abstract_export(model_cfg: ModelConfig, space: SpaceConfig, arch: Arch) -> Model:
  """What `export` makes of `arch`, with shapes-only parameters (no supernet needed)."""
  return abstract_model(model_cfg, dense_dims(space, arch)[0])


def fill_model(abstract: Model, values: Mapping[tuple, jax.Array | np.ndarray]) -> Model:
  """Builds a concrete model from an abstract one and a value for every parameter path."""
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    var.set_value(jax.numpy.asarray(values[path], var.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def sliced(supernet: Model, dims: ModelDims, source: list[int]) -> Model:
  """A model of `dims` whose every array is the leading block of the supernet's (its layer i
  from the supernet's layer `source[i]`). Traceable: the supernet's arrays may be jit tracers."""
  abstract = abstract_model(supernet.cfg, dims)
  super_params = flat_params(supernet)
  values = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    src = path
    if path[0] == 'layers':
      src = (path[0], source[path[1]]) + path[2:]
    full = super_params[src]
    if any(n > m for n, m in zip(var.shape, full.shape)):
      raise ValueError(f'cannot slice {src} of shape {full.shape} to {var.shape}')
    values[path] = full[tuple(slice(0, n) for n in var.shape)]
  return fill_model(abstract, values)


def export(supernet: Model, space: SpaceConfig, arch: Arch) -> Model:
  """The dense model computing exactly what `supernet(batch, arch)` computes."""
  return slicer(space, arch)(supernet)


@dataclasses.dataclass(frozen=True)
class Slicer:
  """`export` for a traced supernet: `slicer(supernet)` is the dense model of one arch, whose
  arrays are slices of the supernet's (differentiable: a training step can run a sub-network
  this way and its gradient flows back into the supernet's arrays). `source`: the supernet layer
  of each of the dense model's layers."""

  dims: ModelDims
  source: tuple[int, ...]

  def __call__(self, supernet: Model) -> Model:
    return sliced(supernet, self.dims, list(self.source))


def slicer(space: SpaceConfig, arch: Arch) -> Slicer:
  """The `Slicer` of `arch` (a concrete arch, read now)."""
  dims, source = dense_dims(space, arch)
  return Slicer(dims, tuple(source))


def narrow(supernet: Model, hidden: int) -> Model:
  """The supernet with its hidden width cut to the leading `hidden` channels, every layer, block
  type, head and FFN unit kept. Still a supernet: for any arch with `arch.hidden <= hidden` it
  computes exactly what `supernet(batch, arch)` does (hidden masks are prefixes), with matmuls,
  norms and logits that much narrower. Traceable, so a compiled population forward can branch
  to it (`evaluation.evaluate_population`'s `hidden_buckets`)."""
  if not 0 < hidden <= supernet.dims.hidden:
    raise ValueError(f'cannot narrow a hidden width of {supernet.dims.hidden} to {hidden}')
  dims = dataclasses.replace(supernet.dims, hidden=int(hidden))
  return sliced(supernet, dims, list(range(len(dims.layers))))


def import_dense(supernet: Model, space: SpaceConfig, arch: Arch, dense: Model) -> None:
  """The inverse of `export`: writes a dense model's arrays into the leading slices of the
  supernet's (in place), so training can start from an exported (or pruned) model."""
  dims, source = dense_dims(space, arch)
  if dims != dense.dims:
    raise UserError(f'the exported model does not match its source arch in this space: '
                    f'{dense.dims} != {dims}')
  super_state = nnx.state(supernet, nnx.Param)
  flat = dict(nnx.to_flat_state(super_state))
  for path, value in flat_params(dense).items():
    dst = (path[0], source[path[1]]) + path[2:] if path[0] == 'layers' else path
    var = flat[dst]
    var.set_value(var[...].at[tuple(slice(0, n) for n in value.shape)].set(value))
  nnx.update(supernet, nnx.from_flat_state(list(flat.items())))


def param_count(model: nnx.Module) -> int:
  return int(sum(np.prod(v.shape) for v in flat_params(model).values()))


def param_key(path: tuple) -> str:
  return '.'.join(str(p) for p in path)


HF_REPORT_FILE = 'elastic_jax_export.json'  # beside every Hugging Face export (elastic_jax.hf)


def write_export_dir(out: str | Path, write, *, overwrite: bool = False) -> Path:
  """Writes an export directory atomically (`write(tmp_dir)`), refusing to replace anything but
  an earlier export, and that only with `overwrite` (see `check_out`)."""
  return atomic.write_dir(Path(out), write, replace=check_out(out, overwrite))


def is_export(directory: str | Path) -> bool:
  """Whether `directory` holds a model an export wrote: native (its config.json names our
  format) or Hugging Face (with our export report beside it)."""
  if (Path(directory) / HF_REPORT_FILE).is_file():
    return True
  path = Path(directory) / CONFIG_FILE
  try:
    return json.loads(path.read_text()).get('format') == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def check_out(out: str | Path, overwrite: bool = False) -> bool:
  """Refuses an `out` that holds anything but an earlier export (and that one without
  `overwrite`): an export never deletes a user's files. Returns whether `out` exists (an empty
  directory, or an earlier export to replace)."""
  out = Path(out)
  if not out.exists() and not out.is_symlink():
    return False
  if out.is_dir() and not out.is_symlink():
    if not any(out.iterdir()):
      return True
    if is_export(out):
      if overwrite:
        return True
      raise UserError(f'--out {out} holds an earlier export; pass --overwrite to replace it, or '
                      'choose another --out')
    raise UserError(f'--out {out} is a directory holding other files, not an exported model; '
                    'choose a new path (nothing was written)')
  raise UserError(f'--out {out} is an existing file; choose a new path (nothing was written)')


def save(model: Model, out: str | Path, *, arch: Arch | None = None,
         extra: Mapping | None = None, files: Mapping[str, str | Path] | None = None,
         overwrite: bool = False, write_more=None) -> Path:
  """Saves a dense model as `config.json` + `model.safetensors` (atomically).

  `out` must not exist, or be an empty directory, or (with `overwrite`) an earlier export
  (`check_out`).

  `extra` goes into config.json (e.g. the data config for evaluation); `files` are copied in
  (e.g. the tokenizer). With `arch` (the supernet's sub-network it came from), `arch.json` holds
  it too. `write_more(tmp_dir)` writes more files into the directory before it is renamed into
  place (a SCONE sub-network's table).
  """
  from safetensors.numpy import save_file

  config = {
      'format': FORMAT,
      'elastic_jax_version': __version__,
      'model': dataclasses.asdict(model.cfg),
      'dims': model.dims.to_json(),
      'params': param_count(model),
      'source_arch': arch_lib.to_json(arch) if arch is not None else None,
      **(dict(extra) if extra else {}),
  }
  tensors = {param_key(p): np.asarray(v) for p, v in flat_params(model).items()}

  def write(tmp: Path):
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={'format': FORMAT})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
    if arch is not None:  # the sub-network, for `train --config.train.arch=DIR/arch.json`
      (tmp / ARCH_FILE).write_text(arch_lib.dumps(arch) + '\n')
    for name, src in (files or {}).items():
      shutil.copyfile(src, tmp / name)
    if write_more is not None:
      write_more(tmp)

  return write_export_dir(out, write, overwrite=overwrite)


# What to do about an exported model's unreadable files; a model that is no export (the original
# an import wrote into a workdir) names its own remedy (`fix`).
REEXPORT = 're-export the model'


def read_config(directory: str | Path, fix: str = REEXPORT) -> dict:
  directory = Path(directory)
  path = directory / CONFIG_FILE
  config = read_json(path, f'{directory} is not an exported model: {CONFIG_FILE} is missing; '
                     'create one with `elastic-jax export`', fix)
  if not isinstance(config, dict):
    raise UserError(f'{path} does not describe an exported model; {fix}')
  if config.get('format') != FORMAT and ('space' in config or (directory / 'checkpoints').is_dir()):
    raise UserError(f'{directory} is the workdir of a run, not an exported model: use '
                    f'--workdir={directory} --arch=ARCH.json, or export a sub-network first '
                    f'(`elastic-jax export --workdir={directory} --pick=knee`)')
  if config.get('format') != FORMAT and 'model_type' in config:
    raise UserError(f'{directory} is a Hugging Face model directory, not an elastic_jax export: '
                    f'import it first (`elastic-jax import-hf --model={directory} --out=W`), then '
                    'use --workdir=W')
  if config.get('format') != FORMAT:
    raise UserError(f'{path} has format {config.get("format")!r}, expected {FORMAT!r}')
  return config


def saved_data_config(directory: str | Path, config: Mapping):
  """The data an exported model was trained on (its config.json's `data` section), tokenized by
  the tokenizer exported with it; UserError when the export records none."""
  import ml_collections  # noqa: PLC0415

  directory = Path(directory)
  if not isinstance(config.get('data'), Mapping):
    raise UserError(f'{directory} records no data section (exported without one): pass '
                    '--config=configs/X.py to name the data to evaluate on')
  data_cfg = ml_collections.ConfigDict(dict(config['data']))
  tokenizer = directory / 'tokenizer.json'
  if tokenizer.is_file():
    data_cfg.tokenizer = str(tokenizer)
  elif data_cfg.get('tokenizer', 'bytes') not in ('bytes', 'bpe'):
    raise UserError(f'{directory} has no tokenizer.json and its data section names tokenizer '
                    f'{data_cfg.tokenizer!r}; pass --config=configs/X.py with the right '
                    'data.tokenizer')
  return data_cfg


def load_abstract(directory: str | Path, *, fix: str = REEXPORT) -> tuple[Model, dict]:
  """An exported dense model with shapes-only parameters (its weights not read: what
  `elastic-jax compile` needs of an external teacher), and its config.json. `fix`: the advice
  of every error about its files."""
  directory = Path(directory)
  config = read_config(directory, fix)
  try:
    cfg = ModelConfig(**config['model'])
    dims = ModelDims.from_json(config['dims'])
  except (KeyError, TypeError) as e:
    raise UserError(f'{directory / CONFIG_FILE} does not describe a model ({e}); {fix}') \
        from None
  return abstract_model(cfg, dims), config


def load(directory: str | Path, *, fix: str = REEXPORT) -> tuple[Model, dict]:
  """Loads an exported dense model; returns it and its config.json. `fix`: the advice of every
  error about its files."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  directory = Path(directory)
  abstract, config = load_abstract(directory, fix=fix)
  weights = directory / WEIGHTS_FILE
  if not weights.is_file():
    raise UserError(f'{weights} is missing; {fix}')
  try:
    tensors = load_file(str(weights))
  except (SafetensorError, OSError, ValueError) as e:
    raise UserError(f'{weights} is corrupt or truncated ({e}); {fix}') from None
  values = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    key = param_key(path)
    if key not in tensors:
      raise UserError(f'{weights} lacks tensor {key}; {fix}')
    if tuple(tensors[key].shape) != tuple(var.shape):
      raise UserError(f'{weights}: tensor {key} has shape {tensors[key].shape}, config.json '
                      f'implies {tuple(var.shape)}; {fix}')
    values[path] = tensors[key]
  return fill_model(abstract, values), config


def load_any(directory: str | Path) -> tuple[Model, Path | None]:
  """A dense model from a native export or a Hugging Face directory (through
  `elastic_jax.hf.convert`), and its tokenizer.json (None if there is none)."""
  directory = Path(directory)
  config = read_json(directory / CONFIG_FILE, f'--model {directory}: no {CONFIG_FILE}; pass a '
                     'directory written by `elastic-jax export` or a Hugging Face model directory')
  if isinstance(config, dict) and 'model_type' in config and 'format' not in config:
    from elastic_jax.hf import convert  # noqa: PLC0415
    model = convert.load_dense(directory).model
  else:
    model = load(directory)[0]
  tokenizer = directory / 'tokenizer.json'
  return model, tokenizer if tokenizer.is_file() else None
