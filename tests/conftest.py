"""Shared test helpers: small random models, the shared data folder."""

import os
from pathlib import Path

import jax
import pytest
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get('ELASTIC_JAX_SHARED_DATA', REPO.parent / 'shared' / 'data'))


def randomize(model: nnx.Module, seed: int, scale: float = 0.3) -> nnx.Module:
  """Perturbs every parameter (biases and norm scales too), so no slicing bug hides behind the
  zeros and ones of the initialisation."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.fixture
def shared_data() -> Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f'shared data folder {SHARED_DATA} is absent (set ELASTIC_JAX_SHARED_DATA)')
  return SHARED_DATA
