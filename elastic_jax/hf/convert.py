"""Hugging Face checkpoint <-> elastic_jax dense model, for every supported family.

`load_dense(DIR)` reads a checkpoint into the dense `Model` computing what `transformers` computes
for it; `save_dense(model, OUT)` writes any dense model of a supported family (an exported
sub-network included) as a directory `transformers` loads with no custom code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
from flax import nnx

from elastic_jax import export as export_lib
from elastic_jax.config import ModelConfig
from elastic_jax.errors import UserError
from elastic_jax.hf import bert, checkpoint, gpt2, layout, llama
from elastic_jax.model.supernet import Model

FAMILIES: dict[str, ModuleType] = {mt: m for m in (gpt2, llama, bert) for mt in m.MODEL_TYPES}
REPORT_FILE = export_lib.HF_REPORT_FILE
# Checkpoint entries that are not parameters of the model (buffers, tied copies, the BERT
# next-sentence head): left out of an import and listed in its report.
_NOT_IMPORTED = re.compile(r'(\.attn\.(masked_)?bias$|position_ids$|rotary_emb\.inv_freq$|'
                           r'^lm_head\.weight$|^cls\.predictions\.decoder\.(weight|bias)$|'
                           r'^cls\.seq_relationship\.)')


def family_of(hf_config: Mapping) -> ModuleType:
  model_type = hf_config.get('model_type')
  if model_type not in FAMILIES:
    raise UserError(f'model_type {model_type!r} is not supported; supported: '
                    f'{", ".join(sorted(FAMILIES))}')
  return FAMILIES[model_type]


@dataclasses.dataclass
class Imported:
  """A checkpoint read as a dense model, with what the import did."""

  model: Model
  hf_config: dict
  shape: layout.Shape
  initialised: list[str]  # parameters the checkpoint lacks, from the seeded initialisation
  not_imported: list[str]  # checkpoint entries that are not model parameters


def read_header(directory: str | Path):
  """(model family config, sizes, config.json, the checkpoint's tensors, its family module),
  from config.json and the tensors' names and shapes alone (no weights read)."""
  hf_config = checkpoint.read_config(directory)
  family = family_of(hf_config)
  tensors = checkpoint.Tensors(directory)
  fields, shape = family.model_config(hf_config, set(tensors))
  try:
    cfg = ModelConfig(**fields)
  except UserError as e:
    raise UserError(f'{directory}: {e}') from None
  return cfg, shape, hf_config, tensors, family


def read(directory: str | Path) -> tuple[ModelConfig, layout.Shape, dict, dict, list[str]]:
  """(model family, sizes, config.json, native arrays, unused checkpoint entries)."""
  cfg, shape, hf_config, tensors, family = read_header(directory)
  try:
    native = family.to_native(tensors, hf_config, shape)
  except ValueError as e:  # a tensor that does not reshape to the sizes config.json gives
    module = (tensors.last or '?').rsplit('.', 1)[0]  # the failing one was read last, or its pair
    raise UserError(f'{directory}: the checkpoint tensors of {module!r} do not have the shapes '
                    f'config.json implies ({e}); is config.json the one these weights were saved '
                    'with?') from None
  unused = sorted(set(tensors) - tensors.used)
  unknown = [n for n in unused if not _NOT_IMPORTED.search(n)]
  if unknown:
    raise UserError(f'{directory}: {len(unknown)} checkpoint tensor(s) have no place in a '
                    f'{hf_config["model_type"]} model as elastic_jax reads it, e.g. '
                    f'{unknown[0]!r}; is config.json the one these weights were saved with?')
  return cfg, shape, hf_config, native, unused


def load_dense(directory: str | Path, *, seed: int = 0) -> Imported:
  """The dense model of a Hugging Face checkpoint directory (safetensors; never pickle)."""
  cfg, shape, hf_config, native, unused = read(directory)
  dims = shape.dims()
  abstract = export_lib.abstract_model(cfg, dims)
  values, initialised, seeded = {}, [], None
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    key = export_lib.param_key(path)
    if key not in native:
      if not key.startswith('head.'):
        raise UserError(f'{directory}: no checkpoint tensor maps to parameter {key}')
      if seeded is None:  # e.g. a BERT encoder saved without its MLM head
        seeded = export_lib.flat_params(Model(cfg, dims, rngs=nnx.Rngs(seed)))
      values[path] = seeded[path]
      initialised.append(key)
      continue
    if tuple(native[key].shape) != tuple(var.shape):
      raise UserError(f'{directory}: parameter {key} has shape {tuple(native[key].shape)} in the '
                      f'checkpoint but config.json implies {tuple(var.shape)}')
    values[path] = native[key]
  model = export_lib.fill_model(abstract, values)
  return Imported(model=model, hf_config=hf_config, shape=shape, initialised=initialised,
                  not_imported=unused)


def choose_family(cfg: ModelConfig, base: Mapping) -> ModuleType:
  """The original's family if the model still fits it, else the first family that fits."""
  preferred = FAMILIES.get(base.get('model_type'))
  candidates = ([preferred] if preferred else []) + [gpt2, llama, bert]
  reasons = {}
  for family in candidates:
    why = family.mismatches(cfg)
    if not why:
      return family
    reasons.setdefault(family.MODEL_TYPES[0], why)
  detail = '; '.join(f'{name}: {", ".join(why)}' for name, why in reasons.items())
  raise UserError(f'this model family has no Hugging Face counterpart ({detail}); export it '
                  'with --format native')


def hf_tensors(model: Model, base: Mapping | None = None) -> tuple[dict, dict, dict]:
  """(config.json, tensors, report) of a dense model in Hugging Face form."""
  base = dict(base or {})
  cfg = model.cfg
  family = choose_family(cfg, base)
  params = {export_lib.param_key(p): np.asarray(v, np.float32)
            for p, v in export_lib.flat_params(model).items()}
  tied_width = family is not llama
  uniform, shape = layout.uniform(params, model.dims, mha_only=tied_width, tied_width=tied_width,
                                  family=family.MODEL_TYPES[0], heads_divide_hidden=True)
  config, tensors = family.from_native(uniform, cfg, shape, base)
  real, stored = layout.count(params), layout.count(uniform)
  per_layer = [dataclasses.asdict(l) for l in model.dims.layers]
  report = {
      'model_type': config['model_type'], 'architectures': config['architectures'],
      'params_real': real, 'params_stored': stored,
      'uniform': dataclasses.asdict(shape),
      'padded': stored != real,
      'note': ('per-layer sizes differ: written zero-padded to the widest layer (and grouped '
               'KV heads replicated), which leaves the function unchanged' if stored != real
               else 'written as is'),
      'layers': [{k: l[k] for k in ('heads', 'kv_groups', 'ffn')} for l in per_layer],
  }
  return config, tensors, report


def save_dense(model: Model, out: str | Path, *, base: Mapping | None = None,
               files: Mapping[str, Path] | None = None, extra: Mapping | None = None,
               overwrite: bool = False) -> dict:
  """Writes `model` as a Hugging Face directory (atomically; an existing `out` only if it is an
  earlier export and `overwrite`); returns the export report."""
  config, tensors, report = hf_tensors(model, base)
  report = {**report, **(dict(extra) if extra else {})}

  def write(tmp: Path):
    checkpoint.write(tmp, config, tensors, files or {})
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + '\n')

  export_lib.write_export_dir(out, write, overwrite=overwrite)
  return report


def logits_reference(directory: str | Path, batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Logits `transformers` computes for a checkpoint (needs the `hf` extra; for tests, benches)."""
  import torch
  import transformers

  hf_config = checkpoint.read_config(directory)
  auto = (transformers.AutoModelForMaskedLM if hf_config['model_type'] in bert.MODEL_TYPES
          else transformers.AutoModelForCausalLM)
  model = auto.from_pretrained(str(directory), dtype=torch.float32).eval()
  kwargs = {'input_ids': torch.as_tensor(np.asarray(batch['tokens']), dtype=torch.long)}
  if 'attention_mask' in batch:
    kwargs['attention_mask'] = torch.as_tensor(np.asarray(batch['attention_mask']))
  if 'token_types' in batch:
    kwargs['token_type_ids'] = torch.as_tensor(np.asarray(batch['token_types']), dtype=torch.long)
  with torch.no_grad():
    return model(**kwargs).logits.numpy()


