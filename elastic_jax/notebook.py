"""What the Colab notebooks (colab/*.ipynb) need besides the library's jobs: their "small" switch
and the experiment configs the CLI reads from `--config=configs/X.py[:arg]`, so a notebook runs
exactly what the matching command runs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ml_collections

from elastic_jax.errors import UserError

SMALL_ENV = 'ELASTIC_JAX_NOTEBOOK_SMALL'
# The checkout's root when the package is imported from one (an editable install or PYTHONPATH).
REPO = Path(__file__).resolve().parents[1]


def small_mode() -> bool:
  """True when ELASTIC_JAX_NOTEBOOK_SMALL is set to 1/true/yes (CI's tiny runs); '', 0, false
  or unset: full size."""
  value = os.environ.get(SMALL_ENV, '').strip().lower()
  if value in ('', '0', 'false', 'no'):
    return False
  if value in ('1', 'true', 'yes'):
    return True
  raise UserError(f'{SMALL_ENV}={value!r}: set it to 1 (small run) or 0 (full size)')


def load_config(spec: str, root: str | Path | None = None) -> ml_collections.ConfigDict:
  """The config of `spec`, 'configs/X.py[:arg]' (relative to `root`, default the checkout), as
  `--config=spec` loads it: the file's `get_config(arg)`."""
  path, _, arg = spec.partition(':')
  file = Path(root or REPO) / path
  if not file.is_file():
    raise UserError(f'config file {file} does not exist; give a path such as '
                    "'configs/quickstart.py' relative to the elastic_jax checkout")
  module_spec = importlib.util.spec_from_file_location(f'_elastic_jax_config_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as e:
    raise UserError(f'{spec}: {e}') from None
