"""Latency measurement, shared by the search report, `compress` and the benches: the median
wall time of repeated calls after a warm-up call (which compiles), blocking on the result."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax import evaluation


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
  """Median seconds of `repeats` calls of `fn()` after `warmup` calls, each call blocked until
  its (JAX) outputs are ready; other outputs (e.g. torch tensors) are returned as they are."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def forward_ms(model: nnx.Module, batch: Mapping, repeats: int = 5) -> float:
  """Median milliseconds of one jitted forward of `batch` through a (dense) model; the first
  call compiles and is not timed."""
  inputs = {k: jnp.asarray(v) for k, v in evaluation.model_inputs(batch).items()}
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return 1e3 * median_seconds(lambda: forward(state, inputs), repeats)
