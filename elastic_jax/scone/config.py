"""The `scone` config section (SCONE f-gram embeddings), every field commented; its typed form."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections

from elastic_jax.config import SpaceConfig, check_known_fields
from elastic_jax.errors import UserError
from elastic_jax.scone.fgrams import check_max_n


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.enabled = False  # off: the model, data and training are exactly those without SCONE
  c.max_n = 5  # K: f-grams are n-grams with n = 2..K (the paper's default; gains plateau at 4)
  c.min_count = 5  # an n-gram must occur this often in the training split (the paper's 5)
  c.num_fgrams = 10000  # S: the most frequent f-grams kept
  # The f-gram model (a decoder of the model family without a token embedding, positions 1..K):
  c.layers = 1  # transformer blocks
  c.width = 64  # its hidden width (token embeddings are projected hidden -> width -> hidden)
  c.heads = 2  # attention heads (head size width / heads)
  c.ffn = 128  # FFN width
  c.table_batch = 1024  # f-grams per jitted call when the embedding table is precomputed
  return c


@dataclasses.dataclass(frozen=True)
class SconeConfig:
  max_n: int = 5
  min_count: int = 5
  num_fgrams: int = 10000
  layers: int = 1
  width: int = 64
  heads: int = 2
  ffn: int = 128
  table_batch: int = 1024

  def __post_init__(self):
    check_max_n(self.max_n)
    for name in ('min_count', 'num_fgrams', 'layers', 'width', 'heads', 'ffn', 'table_batch'):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(f'config field scone.{name}={v!r} must be an integer >= 1')
    if self.width % self.heads:
      raise UserError(f'config field scone.heads={self.heads} must divide scone.width='
                      f'{self.width}')


def scone_config(cfg: Mapping | None) -> SconeConfig | None:
  """The typed section, or None when it is absent or `enabled` is False."""
  if cfg is None or not cfg.get('enabled', False):
    return None
  values = dict(cfg)
  values.pop('enabled')
  check_known_fields('scone', values,
                     {f.name for f in dataclasses.fields(SconeConfig)} | {'enabled'})
  return SconeConfig(**values)


# Elastic dimensions of the space (`space.<name>`) and the `scone` field holding each one's maximum.
SPACE_FIELDS = {'fgrams': 'num_fgrams', 'fgram_layers': 'layers', 'fgram_ffn': 'ffn'}


def with_scone_choices(space: SpaceConfig, scfg: SconeConfig | None) -> SpaceConfig:
  """The space with SCONE's dimensions: each `space.<dim>` the config lists (choices, each at most
  the `scone` section's maximum the supernet is built with), else that maximum alone. Without
  SCONE the space must list none."""
  if scfg is None:
    listed = [f'space.{f}' for f in SPACE_FIELDS if getattr(space, f)]
    if listed:
      raise UserError(f'config field(s) {", ".join(listed)} are SCONE dimensions: set '
                      'scone.enabled=True, or leave them empty')
    return space
  values = {}
  for f, maximum in SPACE_FIELDS.items():
    top = getattr(scfg, maximum)
    choices = getattr(space, f) or (top,)
    if max(choices) > top:
      raise UserError(f'config field space.{f}={list(choices)} is invalid: choices must be <= '
                      f'scone.{maximum}={top}, the largest the supernet is built with')
    values[f] = choices
  return dataclasses.replace(space, **values)
