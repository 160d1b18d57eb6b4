"""What every Hugging Face model family module provides, and the checks they share.

A family module (`gpt2`, `llama`, `bert`) maps one `model_type` group both ways:
- `model_config(hf) -> (ModelConfig fields, Shape)`: the elastic_jax model family and sizes of a
  `config.json`; a setting elastic_jax cannot reproduce exactly is refused by name;
- `to_native(tensors, hf, shape) -> {native name: array}`: the checkpoint's arrays under the
  names of `elastic_jax.model.Model`'s parameters (the dense model of `shape`);
- `mismatches(cfg) -> [reason]`: why a ModelConfig cannot be written as this family ([] if it can);
- `from_native(params, cfg, shape, base) -> (config.json, tensors)`: the inverse, for a model
  already made uniform by `layout.uniform`; `base` is the imported original's config.json (its
  token ids and unrelated fields are kept) or {}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from elastic_jax.config import ModelConfig
from elastic_jax.errors import UserError


def refuse(hf: Mapping, field: str, value: Any, why: str) -> UserError:
  return UserError(f'{hf.get("model_type")} config field {field}={value!r} is not supported: '
                   f'{why}')


def require(hf: Mapping, field: str, allowed: Sequence, default: Any) -> Any:
  """The value of `field` (or its transformers default), which must be one of `allowed`."""
  value = hf.get(field, default)
  if value not in allowed:
    raise refuse(hf, field, value, f'elastic_jax reproduces only {list(allowed)}')
  return value


def expect(cfg: ModelConfig, **wanted) -> list[str]:
  """Reasons (model.FIELD=value, needs V) why `cfg` differs from the `wanted` fields."""
  return [f'model.{k}={getattr(cfg, k)!r} (needs {v!r})' for k, v in wanted.items()
          if getattr(cfg, k) != v]


def first(tensors: Mapping, *names: str) -> str:
  """The first of `names` the checkpoint holds (checkpoints differ in prefixes and old names)."""
  for name in names:
    if name in tensors:
      return name
  return names[0]  # missing: reading it raises the one-line error naming it


def prefix(tensors: Mapping, probe: str, prefixes: Sequence[str]) -> str:
  """The key prefix under which this checkpoint stores its base model ('' for a bare one)."""
  for p in prefixes:
    if p + probe in tensors:
      return p
  return ''
