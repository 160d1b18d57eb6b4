"""PCA-guided FFN width growth (ELM): measure, rank, grow within a budget.

Measure: for each block type, the largest allowed arch with every layer of that type runs on the
calibration batch and each layer's FFN pre-activations get W-PCA's count
(`proxies.pca.pca_count_linear`, from the FFN's input and first kernel: the same count without
forming the activations). One jitted call serves every measurement (the archs are data).

Grow: the (layer, block type) FFNs below the cap, ranked by their PCA count averaged over the
measurements since the last growth point (or by that count's share of its maximum, `rank`;
ties: the earlier layer, then block); the top
`growth_fraction` of them, in rank order, each grow their largest allowed width by one step,
skipping any growth that would lift the mean parameter count of uniformly sampled architectures
above the budget.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elastic_jax.arch import Arch
from elastic_jax.evaluation import model_inputs
from elastic_jax.proxies.pca import pca_count_linear
from elastic_jax.space import GLOBAL_GENES, LAYER_GENES, Limits, Space
from elastic_jax.train.step import valid_tokens


def probe_archs(space: Space, limits: Limits, kinds: list[int]) -> Arch:
  """Arch[len(kinds)]: per block-type index (into space.blocks), the largest allowed arch whose
  every layer has that type."""
  genomes = []
  for b in kinds:
    g = np.asarray(space.gene_sizes) - 1
    for layer in range(space.num_layers):
      g[GLOBAL_GENES + layer * LAYER_GENES] = b
    genomes.append(g)
  limits = jax.tree.map(jnp.asarray, limits)
  return jax.vmap(lambda g: space.decode(g, limits))(jnp.asarray(np.stack(genomes), jnp.int32))


def make_measure(graphdef, eta: float):
  """measure(model_params, batch, archs) -> int32[A, L]: the PCA count of every layer's FFN
  pre-activations, per probe arch. One jitted function keyed by the model's structure: another
  run of the same model in this process (a resumed `train`) reuses its trace."""
  return functools.partial(_measure, graphdef=graphdef, eta=float(eta))


@functools.partial(jax.jit, static_argnames=('graphdef', 'eta'))
def _measure(params, batch, archs, *, graphdef, eta: float):
  model = nnx.merge(graphdef, params)
  w_N = valid_tokens(batch).reshape(-1)

  def one(arch):
    feats = model.features(model_inputs(batch), arch, ('ffn_in', 'ffn_kernel'))
    return jnp.stack([pca_count_linear(x_BTD.reshape(-1, x_BTD.shape[-1]), k_DxF, eta, w_N)
                      for x_BTD, k_DxF in zip(feats['ffn_in'], feats['ffn_kernel'])])

  return jax.lax.map(one, archs)


def make_mean_params(space: Space, n: int, seed: int):
  """mean_params(limits) -> float: mean parameter count of `n` uniform archs within the limits
  (a fixed draw: the same limits always give the same value; one trace for any limits)."""
  key = jax.random.key(seed)

  @jax.jit
  def mean_params(limits):
    archs = jax.vmap(lambda g: space.decode(g, limits))(space.random_genomes(key, n, limits))
    return jnp.mean(jax.vmap(lambda a: space.cost(a)['params'])(archs).astype(jnp.float32))

  return lambda limits: float(mean_params(jax.tree.map(jnp.asarray, limits)))


def ffn_input_width(space: Space, kind: str) -> int:
  """The width an FFN of block type `kind` reads: a bottleneck's inner width, else hidden."""
  return max(space.cfg.inner) if kind == 'bottleneck' else max(space.cfg.hidden)


def grow(space: Space, ffn_max: list[list[int]], pca_LxB: np.ndarray, *, step: int, cap: int,
         fraction: float, budget: int, mean_params, heads_ok, rank: str = 'count'
         ) -> tuple[list[list[int]], list]:
  """(the new largest allowed widths, [{layer, block, from, to, pca}] of what grew).

  `rank`: 'count' ranks by the mean PCA count itself (the reference); 'share' by the count over
  the most it can be, min(FFN input width, largest allowed width), which compares block types of
  different widths (a bottleneck FFN reads only its inner width, so its raw count stays low)."""
  blocks = space.cfg.blocks
  new = [list(row) for row in ffn_max]
  candidates = [(layer, b) for layer in range(space.num_layers) for b, kind in enumerate(blocks)
                if kind != 'skip' and new[layer][b] < cap]
  if not candidates:
    return new, []

  def score(lb):
    layer, b = lb
    value = float(pca_LxB[layer, b])
    if rank == 'share':
      value /= max(min(ffn_input_width(space, blocks[b]), new[layer][b]), 1)
    return value

  # Descending score; the sort is stable, so ties keep the (layer, block) order.
  ranked = sorted(candidates, key=lambda lb: -score(lb))
  top = ranked[:max(1, math.ceil(fraction * len(candidates)))]
  grown = []
  for layer, b in top:
    trial = [list(row) for row in new]
    trial[layer][b] = min(new[layer][b] + step, cap)
    limits = Limits(ffn_max=np.asarray(trial, np.int32), heads_ok=heads_ok)
    if budget and mean_params(limits) > budget:
      continue
    grown.append({'layer': layer, 'block': blocks[b], 'from': new[layer][b],
                  'to': trial[layer][b], 'pca': float(pca_LxB[layer, b]),
                  'score': score((layer, b))})
    new = trial
  return new, grown
