"""Genome algebra for the search job: analytic costs of genomes, the space's extreme genomes, and
canonical genomes (one per network), all for a `Space`.

Hashable callables (`CanonicalKey`, `ParamsOf`) are equal by the space's key, so jitted search
loops that take them as static arguments are shared between equal searches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax.arch import host_jit
from elastic_jax.config import BLOCK_TYPES, FLEXIBERT_BLOCKS
from elastic_jax.space import GLOBAL_GENES, LAYER_GENES, SCONE_GENES, Space

# Analytic costs: name -> key of `cost.arch_cost`.
COST_KEYS = {
    'params': 'params',
    'flops': 'flops_per_token',
    'train_flops': 'train_flops_per_token',
    'kv_cache': 'kv_cache_bytes_per_token',
    'activation_memory': 'activation_bytes_per_token',
    'param_bytes': 'param_bytes',
    'table_mb': 'table_mb',
}
COST_INFO = {
    'params': ('parameters', 1e6, 'M'),
    'flops': ('forward FLOPs per token', 1e6, 'MFLOP/token'),
    'train_flops': ('training FLOPs per token (3 x forward)', 1e6, 'MFLOP/token'),
    'kv_cache': ('KV-cache bytes per token', 1e3, 'kB/token'),
    'activation_memory': ('activation bytes per token kept for backward (estimate)', 1e3,
                          'kB/token'),
    'param_bytes': ('parameter bytes', 1e6, 'MB'),
    'table_mb': ('SCONE f-gram table in host memory (f-grams x hidden x 4 bytes)', 1.0, 'MB'),
}


def genome_costs(space: Space, genomes_BxG) -> dict[str, np.ndarray]:
  """Host convenience: the analytic costs of genomes (`Space.genome_costs`)."""
  return space.genome_costs(genomes_BxG)


def decode_genomes(space: Space, genomes_BxG):
  """Host convenience: the architectures of genomes, one `Arch` of numpy arrays [B, ...]
  (`arch_at` takes one out)."""
  return space.decode_genomes(genomes_BxG)


def arch_at(archs, i: int):
  """Architecture i of a batch from `decode_genomes`."""
  return jax.tree.map(lambda x: x[i], archs)


def canonical_genomes_host(space: Space, genomes_BxG) -> np.ndarray:
  """Host convenience: `canonical_genomes` as numpy, one jitted call (padded batches)."""
  return space.padded_call(functools.partial(canonical_genomes, space), genomes_BxG)


def extreme_genome(space: Space, name: str, largest: bool) -> np.ndarray:
  """The genome of the exact min (max) of the analytic cost `name` (a COST_KEYS name) over the
  whole space, 'skip' layers included (`Space.extreme_genome`)."""
  return space.extreme_genome(largest, cost=COST_KEYS[name], allow_skip=True)


def extreme_genomes(space: Space) -> np.ndarray:
  """[2, G]: the genomes of the fewest and of the most parameters."""
  return np.stack([extreme_genome(space, 'params', largest=False),
                   extreme_genome(space, 'params', largest=True)])


def extreme_value(space: Space, name: str, largest: bool) -> float:
  """Exact min (max) of an analytic cost over the space (see `extreme_genome`)."""
  genome = extreme_genome(space, name, largest)
  return float(genome_costs(space, genome[None])[COST_KEYS[name]][0])


@host_jit(static_argnames=('space',))
def canonical_genomes(space: Space, genomes_BxG: jax.Array) -> jax.Array:
  """One genome per architecture (jittable; from host code, one compiled call): genes that do
  not change the computed network are zeroed, so equal architectures get equal genomes.

  The encoding is redundant: a layer beyond `depth` ignores all its genes, a 'skip' layer all but
  its block gene, a non-bottleneck layer its `inner` gene, and a kv gene maps to the divisor of
  the layer's heads that `Space.decode` picks. Exact duplicate rejection on raw genomes misses
  these clones; the search job compares canonical genomes instead.
  """
  genomes_BxG = jnp.asarray(genomes_BxG, jnp.int32)
  archs = jax.vmap(space.decode)(genomes_BxG)
  enc_BxG = jax.vmap(space.encode)(archs)  # re-encoding maps kv choices to the decoded divisor
  b = enc_BxG.shape[0]
  end = GLOBAL_GENES + space.num_layers * LAYER_GENES
  per_BxLxK = enc_BxG[:, GLOBAL_GENES:end].reshape(b, space.num_layers, LAYER_GENES)
  within_BxL = jnp.arange(space.num_layers)[None, :] < archs.depth[:, None]
  on_BxL = archs.layer_on()
  bottleneck_BxL = archs.block == BLOCK_TYPES.index('bottleneck')
  keep_BxLxK = jnp.stack([within_BxL, on_BxL, on_BxL, on_BxL, on_BxL & bottleneck_BxL], axis=-1)
  per_BxLxK = jnp.where(keep_BxLxK, per_BxLxK, 0)
  parts = [enc_BxG[:, :GLOBAL_GENES], per_BxLxK.reshape(b, -1)]
  if space.ffn_layer_genes:  # stacked-FFN genes count only in FlexiBERT layers that are on
    flexi_BxL = jnp.isin(archs.block, jnp.asarray([BLOCK_TYPES.index(k)
                                                   for k in FLEXIBERT_BLOCKS]))
    parts.append(jnp.where(on_BxL & flexi_BxL, enc_BxG[:, end:end + space.num_layers], 0))
  if space.scone_genes:  # SCONE's genes always change the network
    parts.append(enc_BxG[:, space.num_genes - len(SCONE_GENES):])
  return jnp.concatenate(parts, axis=1)




@dataclasses.dataclass(frozen=True)
class CanonicalKey:
  """`canonical_genomes` as the search loop's dedupe key (a static jit argument, equal by the
  space's key): children that are the same network as an evaluated genome are resampled."""

  space: Any = dataclasses.field(compare=False, repr=False)
  space_key: tuple = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, 'space_key', self.space.key())

  def __call__(self, genomes_BxG):
    return canonical_genomes(self.space, genomes_BxG)


@dataclasses.dataclass(frozen=True)
class ParamsOf:
  """genomes -> float32[B] parameter counts (a static jit argument, equal by the space's key)."""

  space: Any = dataclasses.field(compare=False, repr=False)
  space_key: tuple = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, 'space_key', self.space.key())

  def __call__(self, genomes_BxG):
    cost = jax.vmap(lambda g: self.space.cost(self.space.decode(g)))(genomes_BxG)
    return cost['params'].astype(jnp.float32)
