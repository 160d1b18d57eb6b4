"""A run's working directory: its config, its supernet, and what later commands find there.

Layout of W:
  config.json       the experiment config (ConfigDict as JSON), written by the first command
  checkpoints/      Orbax checkpoints of supernet training (see `elastic_jax/checkpoints.py`)
  checkpoints_unreadable/  checkpoints a training run could not read, moved aside for inspection
  search/           search outputs (pareto.json, history.jsonl, pareto.png, ...)
  export/           exported dense models

Commands given `--workdir W` without `--config` read W/config.json. A workdir without a trained
supernet uses the config's seeded initialisation, so every command works before training exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import ml_collections
from flax import nnx

from elastic_jax.config import check_compatible, model_config, space_config
from elastic_jax.errors import UserError
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

CONFIG_FILE = 'config.json'


def write_text_atomic(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', dir=path.parent)
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def save_config(workdir: str | Path, cfg: ml_collections.ConfigDict) -> None:
  write_text_atomic(Path(workdir) / CONFIG_FILE, cfg.to_json_best_effort(indent=2) + '\n')


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise UserError(f'workdir {workdir} has no {CONFIG_FILE}; pass --config=configs/X.py')
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON ({e}); pass --config=configs/X.py') from None


def resolve_config(workdir: str | None, cfg: ml_collections.ConfigDict | None):
  """The config of a command: --config if given, else the workdir's saved one."""
  if cfg is not None:
    return cfg
  if workdir:
    return load_config(workdir)
  raise UserError('pass --config=configs/X.py (or --workdir of a run that has a config.json)')


def build_space(cfg: ml_collections.ConfigDict) -> Space:
  model, space = model_config(cfg.model), space_config(cfg.space)
  check_compatible(model, space)
  seq_len = cfg.get('data', {}).get('seq_len', None)
  return Space(model, space, seq_len=seq_len)


def init_supernet(cfg: ml_collections.ConfigDict, space: Space | None = None) -> Model:
  """The supernet at the config's seeded initialisation."""
  space = space or build_space(cfg)
  return Model(space.model, space.cfg.supernet_dims(), rngs=nnx.Rngs(int(cfg.get('seed', 0))))


def load_supernet(cfg: ml_collections.ConfigDict, workdir: str | None,
                  space: Space | None = None) -> tuple[Model, int | None]:
  """The latest trained supernet in `workdir` if there is one, else the seeded initialisation.

  Returns the model and the training step it comes from (None for the initialisation).
  """
  space = space or build_space(cfg)
  model = init_supernet(cfg, space)
  step = None
  if workdir:
    from elastic_jax import checkpoints  # noqa: PLC0415  (Orbax loads only when needed)
    step = checkpoints.restore_params_if_any(Path(workdir), model)
  init_from = cfg.get('train', {}).get('init_from', '')
  if step is None and init_from:  # e.g. an imported pre-trained model, not yet fine-tuned
    apply_init_from(init_from, model, space)
  return model, step


def apply_init_from(path: str, model: Model, space: Space) -> str:
  """Writes the weights `train.init_from` names into the supernet (in place); returns what they
  were. `path`: an exported dense model (placed at its source arch), a workdir with checkpoints
  (its latest supernet), or `hf:DIR`, a Hugging Face checkpoint (placed as the sub-network of its
  own sizes, which must be in the space)."""
  from elastic_jax import arch as arch_lib
  from elastic_jax import export as export_lib
  if path.startswith('hf:'):
    from elastic_jax.hf import convert
    from elastic_jax.hf.space import original_arch
    imported = convert.load_dense(path[3:])
    numerics = dict(dtype='float32', param_dtype='float32', init_std=0.0)  # not the function
    if dataclasses.replace(imported.model.cfg, **numerics) != dataclasses.replace(space.model,
                                                                                   **numerics):
      raise UserError(f'config field train.init_from={path!r}: the checkpoint\'s model family '
                      f'{imported.model.cfg} differs from the config\'s model section '
                      f'{space.model}; import it with `elastic-jax import-hf` instead')
    arch = arch_lib.from_json(original_arch(imported.shape, space.num_layers), space.cfg)
    export_lib.import_dense(model, space.cfg, arch, imported.model)
    return f'Hugging Face checkpoint {path[3:]}'
  p = Path(path)
  if (p / export_lib.CONFIG_FILE).is_file():
    dense, saved = export_lib.load(p)
    source = saved.get('source_arch')
    if source is None:
      raise UserError(f'{p} records no source_arch; it cannot be placed into this supernet')
    export_lib.import_dense(model, space.cfg, arch_lib.from_json(source, space.cfg), dense)
    return f'exported model {p}'
  from elastic_jax import checkpoints  # noqa: PLC0415
  if checkpoints.restore_params_if_any(p, model) is not None:
    return f'workdir {p}'
  raise UserError(f'config field train.init_from={path!r}: neither an exported model, a '
                  'workdir with checkpoints nor hf:DIR (a Hugging Face checkpoint)')
