"""Hugging Face checkpoint directories on disk: read and write them without torch.

A directory holds `config.json`, the weights as `model.safetensors` (or shards listed in
`model.safetensors.index.json`) and the tokenizer files. Pickled weights (`pytorch_model.bin`,
`*.pt`) are never unpickled: loading a pickle runs arbitrary code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from elastic_jax.errors import UserError

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
TOKENIZER_FILE = 'tokenizer.json'
# Files copied along with the tokenizer when present (roles of special tokens, chat template,
# generation defaults, WordPiece vocabulary).
TOKENIZER_FILES = (TOKENIZER_FILE, 'tokenizer_config.json', 'special_tokens_map.json',
                   'generation_config.json', 'chat_template.jinja', 'vocab.txt')
_PICKLES = ('pytorch_model.bin', 'pytorch_model.bin.index.json', '*.pt', '*.pth', '*.ckpt')
_CONVERT = ('convert it to safetensors first, e.g. with transformers: '
            'AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)')


def _require_dir(directory: Path) -> None:
  if not directory.is_dir():
    raise UserError(f'{directory} is not a directory; pass a Hugging Face model directory '
                    f'(holding {CONFIG_FILE} and {WEIGHTS_FILE})')


def read_config(directory: str | Path) -> dict:
  directory = Path(directory)
  _require_dir(directory)
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise UserError(f'{directory} has no {CONFIG_FILE}: not a Hugging Face model directory')
  try:
    config = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{path} is not valid JSON ({e})') from None
  if not isinstance(config, dict) or 'model_type' not in config:
    raise UserError(f'{path} names no model_type; is it a transformers config.json?')
  return config


def weight_files(directory: str | Path) -> list[Path]:
  """The safetensors files of a checkpoint (one, or the shards of an index)."""
  directory = Path(directory)
  _require_dir(directory)
  index = directory / INDEX_FILE
  if index.is_file():
    try:
      shards = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
      raise UserError(f'{index} is not a safetensors index ({e})') from None
    files = [directory / s for s in shards]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
      raise UserError(f'{index} lists shard(s) {missing} that are missing from {directory}')
    return files
  single = directory / WEIGHTS_FILE
  if single.is_file():
    return [single]
  pickles = sorted(p.name for pattern in _PICKLES for p in directory.glob(pattern))
  if pickles:
    raise UserError(f'{directory} holds only pickled weights ({", ".join(pickles)}); elastic_jax '
                    f'never unpickles (it can run arbitrary code): {_CONVERT}')
  raise UserError(f'{directory} has no {WEIGHTS_FILE} (nor {INDEX_FILE})')


class Tensors(Mapping):
  """The checkpoint's tensors by name, read lazily as float32 NumPy arrays."""

  def __init__(self, directory: str | Path):
    from safetensors import SafetensorError, safe_open

    self._where: dict[str, Path] = {}
    for path in weight_files(directory):
      try:
        with safe_open(str(path), framework='numpy') as f:
          for name in f.keys():
            self._where[name] = path
      except (SafetensorError, OSError) as e:
        raise UserError(f'{path} is not a readable safetensors file ({e})') from None
    self.directory = Path(directory)
    self.used: set[str] = set()
    self.last: str | None = None

  def __getitem__(self, name: str) -> np.ndarray:
    from safetensors import safe_open

    if name not in self._where:
      raise UserError(f'{self.directory}: the checkpoint lacks tensor {name!r}; it is incomplete '
                      'or not of the model type its config.json names')
    self.used.add(name)
    self.last = name  # for a message when converting it fails (its shape)
    path = self._where[name]
    try:
      with safe_open(str(path), framework='numpy') as f:
        return np.asarray(f.get_tensor(name), np.float32)
    except TypeError:  # bfloat16 has no NumPy dtype: read through the flax (JAX) backend
      with safe_open(str(path), framework='flax') as f:
        return np.asarray(f.get_tensor(name).astype('float32'))

  def __contains__(self, name) -> bool:
    return name in self._where

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def tokenizer_files(directory: str | Path) -> dict[str, Path]:
  """The tokenizer files present in `directory` (tokenizer.json required)."""
  directory = Path(directory)
  _require_dir(directory)
  if not (directory / TOKENIZER_FILE).is_file():
    raise UserError(f'{directory} has no {TOKENIZER_FILE}; save the fast tokenizer beside the '
                    'weights (AutoTokenizer.from_pretrained(...).save_pretrained(DIR))')
  return {n: directory / n for n in TOKENIZER_FILES if (directory / n).is_file()}


def write(directory: Path, config: Mapping, tensors: Mapping[str, np.ndarray],
          files: Mapping[str, Path]) -> None:
  """Writes a checkpoint into an (empty, temporary) directory."""
  from safetensors.numpy import save_file

  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            str(directory / WEIGHTS_FILE), metadata={'format': 'pt'})
  (directory / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + '\n')
  for name, src in files.items():
    shutil.copyfile(src, directory / name)
