"""NAS-Bench-BERT (Serianni & Kalita, ACL 2023; CC BY 4.0): its 500 trained FlexiBERT
architectures as archs of `configs/flexibert.py`'s space.

A benchmark record's `hparams.model_hparam_overrides` holds `hidden_size` and
`nas_config.encoder_layers`, a list of {operation_type, operation_parameter, num_operation_heads,
feed_forward_dimension, num_feed_forward}; `scores` holds GLUE dev scores per task and their
average `glue`. Operation (type, parameter) maps to a block type: SA/SDP -> sa_sdp, SA/WMA ->
sa_wma, LT/DFT -> lt_dft, LT/DCT -> lt_dct, DSC/5 -> dsc_5, DSC/9 -> dsc_9. Layers beyond the
record's depth are filled with copies of its last layer (they are off: depth is a prefix).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from elastic_jax import arch as arch_lib
from elastic_jax.arch import Arch
from elastic_jax.config import SpaceConfig
from elastic_jax.errors import UserError, read_json

BENCHMARK_FILE = 'BERT_benchmark.json'
TASKS = ('cola', 'mnli', 'mrpc', 'qnli', 'qqp', 'rte', 'sst', 'sts')
OPERATIONS = {('SA', 'SDP'): 'sa_sdp', ('SA', 'WMA'): 'sa_wma', ('LT', 'DFT'): 'lt_dft',
              ('LT', 'DCT'): 'lt_dct', ('DSC', 5): 'dsc_5', ('DSC', 9): 'dsc_9'}


def block_of(layer: Mapping, where: str) -> str:
  """The block type of one benchmark layer (UserError naming the record and layer)."""
  key = (layer.get('operation_type'), layer.get('operation_parameter'))
  if key not in OPERATIONS:
    allowed = ', '.join(f'{t}/{p}' for t, p in OPERATIONS)
    raise UserError(f'{where}: operation {key[0]}/{key[1]} is outside the FlexiBERT space; '
                    f'allowed: {allowed}')
  return OPERATIONS[key]


def arch_json(record: Mapping, space: SpaceConfig) -> dict:
  """The arch JSON (as `elastic-jax sample` prints) of one benchmark record."""
  rid = record.get('id', '?')
  try:
    overrides = record['hparams']['model_hparam_overrides']
    layers = overrides['nas_config']['encoder_layers']
    hidden = overrides['hidden_size']
  except (KeyError, TypeError):
    raise UserError(f'benchmark record {rid} lacks hparams.model_hparam_overrides.hidden_size / '
                    'nas_config.encoder_layers; is this NAS-Bench-BERT\'s BERT_benchmark.json?') \
        from None
  if not isinstance(layers, list) or len(layers) not in space.depth:
    got = len(layers) if isinstance(layers, list) else type(layers).__name__
    raise UserError(f'benchmark record {rid}: {got} encoder layers is outside the space; allowed '
                    f'layer counts: {list(space.depth)}')
  out = []
  for i, layer in enumerate(layers):
    where = f'benchmark record {rid} layer {i}'
    for field in ('num_operation_heads', 'feed_forward_dimension', 'num_feed_forward'):
      if field not in layer:
        raise UserError(f'{where} lacks {field}')
    out.append({'block': block_of(layer, where), 'heads': layer['num_operation_heads'],
                'kv_groups': layer['num_operation_heads'], 'ffn': layer['feed_forward_dimension'],
                'inner': 0, 'ffn_layers': layer['num_feed_forward']})
  out += [dict(out[-1]) for _ in range(space.num_layers - len(out))]
  return {'hidden': hidden, 'depth': len(layers), 'head_dim': space.head_dim[0], 'layers': out}


def to_arch(record: Mapping, space: SpaceConfig) -> Arch:
  """Parses and validates one record against the space (UserError, one line, when outside)."""
  try:
    return arch_lib.from_json(arch_json(record, space), space)
  except UserError as e:
    raise UserError(f'benchmark record {record.get("id", "?")}: {e}') from None


def load(directory: str | Path) -> list[dict]:
  """The benchmark's records, from `directory/BERT_benchmark.json`."""
  path = Path(directory) / BENCHMARK_FILE
  records = read_json(path, f'{path} does not exist; point at the NAS-Bench-BERT data folder '
                      '(aaronserianni/training-free-nas, data/)')
  if not isinstance(records, list):
    raise UserError(f'{path} must hold a list of records, got {type(records).__name__}')
  return records
