"""The search space as jittable tables: genomes, decoding, sampling, counting.

A genome is int32[G] of *choice indices*: gene g takes values in [0, gene_sizes[g]). Decoding is
a gather from the config's choice lists, so every genome is a valid architecture by construction;
mutation is "resample an index". Layout: [hidden, depth, head_dim] then, per layer,
[block, heads, kv_groups, ffn, inner], then, only in spaces with more than one `ffn_layers`
choice (FlexiBERT's stacked FFNs), one `ffn_layers` gene per layer, then, only in SCONE spaces
(`SpaceConfig.scone`), the genes [fgrams, fgram_layers, fgram_ffn] (so the genomes of every other
space are unchanged).

Per-layer limits (`SpaceConfig.ffn_max`, `heads_allowed`; ELM's dynamic modules, which change
them during training): a layer's FFN gene picks among the widths <= its block type's limit and its
heads gene among the allowed head counts (the largest allowed index <= the gene, else the smallest
allowed), so every genome still decodes to an allowed arch. The limits are data (`Limits`): the
training step passes them in as arrays, so changing them never retraces.

KV groups must divide the head count. The kv gene picks the largest allowed group count that is
<= its choice and divides the layer's heads (or, if none is, the smallest divisor), so the gene
stays valid whatever the heads gene does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from elastic_jax import arch as arch_lib
from elastic_jax.arch import Arch, host_jit
from elastic_jax.config import BLOCK_TYPES, FLEXIBERT_BLOCKS, ModelConfig, SpaceConfig
from elastic_jax.cost import arch_cost
from elastic_jax.errors import UserError

GLOBAL_GENES = 3
LAYER_GENES = 5
SCONE_GENES = ('fgrams', 'fgram_layers', 'fgram_ffn')


@struct.dataclass
class Limits:
  """Per-layer limits inside the choice lists, as arrays (B = len(space.blocks))."""

  ffn_max: jax.Array  # int32[L, B]: the largest allowed FFN width per layer and block type
  heads_ok: jax.Array  # bool[L, B, H]: which entries of the heads table are allowed


def _pick(gene_N, ok_NxC):
  """Per row: the largest allowed index <= the gene, else the smallest allowed index."""
  idx_C = jnp.arange(ok_NxC.shape[-1])
  below = ok_NxC & (idx_C <= gene_N[:, None])
  largest_below = jnp.max(jnp.where(below, idx_C, -1), axis=-1)
  return jnp.where(largest_below >= 0, largest_below, jnp.argmax(ok_NxC, axis=-1))


class Space:
  """Tables and operations of one search space (for one model family, which costs need)."""

  def __init__(self, model: ModelConfig, space: SpaceConfig, seq_len: int | None = None):
    self.model = model
    self.cfg = space
    self.seq_len = seq_len or model.max_len
    self.num_layers = space.num_layers
    self.tables = {
        'hidden': np.asarray(space.hidden, np.int32),
        'depth': np.asarray(space.depth, np.int32),
        'head_dim': np.asarray(space.head_dim, np.int32),
        'block': np.asarray([BLOCK_TYPES.index(b) for b in space.blocks], np.int32),
        'heads': np.asarray(space.heads, np.int32),
        'kv_groups': np.asarray(space.kv_groups or (0,), np.int32),  # 0: same as heads (MHA)
        'ffn': np.asarray(space.ffn, np.int32),
        'inner': np.asarray(space.inner or (0,), np.int32),
        'ffn_layers': np.asarray(space.ffn_layers, np.int32),
        **{f: np.asarray(getattr(space, f) or (0,), np.int32) for f in SCONE_GENES},
    }
    t = self.tables
    layer_sizes = [len(t['block']), len(t['heads']), len(t['kv_groups']), len(t['ffn']),
                   len(t['inner'])]
    # Trailing per-layer genes of the stacked-FFN depth, only where it is a choice.
    self.ffn_layer_genes = len(space.ffn_layers) > 1
    tail = [len(t['ffn_layers'])] * self.num_layers if self.ffn_layer_genes else []
    self.scone_genes = space.scone
    tail += [len(t[f]) for f in SCONE_GENES] if self.scone_genes else []
    self.gene_sizes = np.asarray(
        [len(t['hidden']), len(t['depth']), len(t['head_dim'])] + layer_sizes * self.num_layers
        + tail, np.int32)
    self.num_genes = int(self.gene_sizes.shape[0])
    self.limited = bool(space.ffn_max or space.heads_allowed)
    self.limits = self.make_limits(space.ffn_max, space.heads_allowed)
    if max(self.parameter_range()) >= 2**31 - 1:
      raise UserError('the largest architecture has >= 2^31 parameters, beyond int32 cost '
                      'arithmetic; shrink the space or run with JAX_ENABLE_X64=1')

  # -- limits ----------------------------------------------------------------------------------
  def make_limits(self, ffn_max=(), heads_allowed=()) -> Limits:
    """`Limits` (NumPy) from per-layer, per-block-type values; () = no limit."""
    num_blocks = len(self.cfg.blocks)
    t = self.tables
    if ffn_max:
      fmax = np.asarray(ffn_max, np.int32).reshape(self.num_layers, num_blocks)
    else:
      fmax = np.full((self.num_layers, num_blocks), t['ffn'].max(), np.int32)
    if heads_allowed:
      ok = np.asarray([[np.isin(t['heads'], hs) for hs in row] for row in heads_allowed], bool)
    else:
      ok = np.ones((self.num_layers, num_blocks, len(t['heads'])), bool)
    return Limits(ffn_max=fmax, heads_ok=ok)

  def _limited_genes(self, per_LxK, limits: Limits):
    """The FFN and heads genes of each layer moved onto allowed choices."""
    blk_L = per_LxK[:, 0]
    rows = jnp.arange(self.num_layers)
    fmax_L = jnp.asarray(limits.ffn_max)[rows, blk_L]
    ffn_ok = jnp.asarray(self.tables['ffn'])[None, :] <= fmax_L[:, None]
    # A limit below every choice (never written by the dynamic modules) keeps the smallest.
    ffn_ok = ffn_ok.at[:, 0].set(True)
    heads_ok = jnp.asarray(limits.heads_ok)[rows, blk_L]
    return (per_LxK.at[:, 3].set(_pick(per_LxK[:, 3], ffn_ok))
            .at[:, 1].set(_pick(per_LxK[:, 1], heads_ok)))

  # -- genomes <-> archs ----------------------------------------------------------------------
  @host_jit(static_argnames=('self',))
  def decode(self, genome_G: jax.Array, limits: Limits | None = None) -> Arch:
    """Genome -> Arch (jittable, vmappable; from host code, one compiled call); `limits`
    (arrays, may be traced) replace the config's."""
    t = {k: jnp.asarray(v) for k, v in self.tables.items()}
    genome_G = jnp.asarray(genome_G, jnp.int32)
    end = GLOBAL_GENES + self.num_layers * LAYER_GENES
    per_LxK = genome_G[GLOBAL_GENES:end].reshape(self.num_layers, LAYER_GENES)
    if limits is not None or self.limited:
      per_LxK = self._limited_genes(per_LxK, self.limits if limits is None else limits)
    if self.ffn_layer_genes:
      ffn_layers_L = t['ffn_layers'][genome_G[end:end + self.num_layers]]
    else:
      ffn_layers_L = jnp.full((self.num_layers,), t['ffn_layers'][0], jnp.int32)
    heads_L = t['heads'][per_LxK[:, 1]]
    if self.cfg.kv_groups:
      kv_K = t['kv_groups']
      chosen_L = kv_K[per_LxK[:, 2]]
      divides_LxK = (heads_L[:, None] % kv_K[None, :]) == 0
      below_LxK = divides_LxK & (kv_K[None, :] <= chosen_L[:, None])
      largest_below = jnp.max(jnp.where(below_LxK, kv_K[None, :], 0), axis=1)
      smallest_divisor = jnp.min(jnp.where(divides_LxK, kv_K[None, :], 2**30), axis=1)
      kv_L = jnp.where(largest_below > 0, largest_below, smallest_divisor)
    else:
      kv_L = heads_L
    return Arch(
        hidden=t['hidden'][genome_G[0]], depth=t['depth'][genome_G[1]],
        head_dim=t['head_dim'][genome_G[2]], block=t['block'][per_LxK[:, 0]], heads=heads_L,
        kv_groups=kv_L.astype(jnp.int32), ffn=t['ffn'][per_LxK[:, 3]],
        inner=t['inner'][per_LxK[:, 4]], ffn_layers=ffn_layers_L, **self._decode_scone(genome_G))

  def _decode_scone(self, genome_G):
    t = {f: jnp.asarray(self.tables[f]) for f in SCONE_GENES}
    if not self.scone_genes:
      return {f: t[f][0] for f in SCONE_GENES}
    return {f: t[f][genome_G[self.num_genes - len(SCONE_GENES) + i]]
            for i, f in enumerate(SCONE_GENES)}

  @host_jit(static_argnames=('self',))
  def encode(self, arch: Arch) -> jax.Array:
    """Arch -> genome (jittable; from host code, one compiled call). The arch must lie in the
    space (see `arch.from_json`)."""
    t = {k: jnp.asarray(v) for k, v in self.tables.items()}
    index = lambda table, v: jnp.argmax(table == jnp.asarray(v)[..., None], axis=-1)
    kv = (index(t['kv_groups'], arch.kv_groups) if self.cfg.kv_groups
          else jnp.zeros_like(arch.heads))
    per_LxK = jnp.stack([index(t['block'], arch.block), index(t['heads'], arch.heads), kv,
                         index(t['ffn'], arch.ffn),
                         index(t['inner'], arch.inner)], axis=-1)
    head = jnp.stack([index(t['hidden'], arch.hidden), index(t['depth'], arch.depth),
                      index(t['head_dim'], arch.head_dim)])
    parts = [head, per_LxK.reshape(-1)]
    if self.ffn_layer_genes:
      parts.append(index(t['ffn_layers'], arch.ffn_layers))
    if self.scone_genes:
      parts.append(jnp.stack([index(t[f], getattr(arch, f)) for f in SCONE_GENES]))
    return jnp.concatenate(parts).astype(jnp.int32)

  # -- sampling ----------------------------------------------------------------------------
  @host_jit(static_argnames=('self', 'n'))
  def random_genomes(self, key: jax.Array, n: int, limits: Limits | None = None) -> jax.Array:
    """[n, G] genomes, each gene uniform over its choices (with limits: a layer's FFN and heads
    genes uniform over the choices its block type allows). From host code, one compiled call
    per `n`."""
    u = jax.random.uniform(key, (n, self.num_genes))
    genomes = jnp.floor(u * self.gene_sizes).astype(jnp.int32)
    if limits is None and not self.limited:
      return genomes
    limits = self.limits if limits is None else limits
    end = GLOBAL_GENES + self.num_layers * LAYER_GENES
    u_NxLxK = u[:, GLOBAL_GENES:end].reshape(n, self.num_layers, LAYER_GENES)
    per_NxLxK = genomes[:, GLOBAL_GENES:end].reshape(n, self.num_layers, LAYER_GENES)
    rows = jnp.arange(self.num_layers)
    blk_NxL = per_NxLxK[..., 0]
    fmax_NxL = jnp.asarray(limits.ffn_max)[rows, blk_NxL]
    n_ffn = jnp.maximum(jnp.sum(jnp.asarray(self.tables['ffn']) <= fmax_NxL[..., None], -1), 1)
    ffn_NxL = jnp.floor(u_NxLxK[..., 3] * n_ffn).astype(jnp.int32)  # allowed widths: a prefix
    ok_NxLxH = jnp.asarray(limits.heads_ok)[rows, blk_NxL]
    j_NxL = jnp.floor(u_NxLxK[..., 1] * jnp.sum(ok_NxLxH, -1)).astype(jnp.int32)
    heads_NxL = jnp.argmax(jnp.cumsum(ok_NxLxH, -1) > j_NxL[..., None], -1).astype(jnp.int32)
    per_NxLxK = per_NxLxK.at[..., 3].set(ffn_NxL).at[..., 1].set(heads_NxL)
    return genomes.at[:, GLOBAL_GENES:end].set(per_NxLxK.reshape(n, -1))

  def extreme_genome(self, largest: bool, *, cost: str = 'params', allow_skip: bool = False,
                     limits: Limits | None = None) -> np.ndarray:
    """The genome of the exact max (min) of the analytic `cost` (a key of `cost()`).

    Every cost is a sum over layers plus global terms and grows with every numeric choice, so the
    extreme takes every numeric gene at its largest (smallest) choice and, layer by layer, the
    block type of the largest (smallest) cost at those settings, the first of ties ('skip' only
    if `allow_skip`): greedy is exact for a sum of independent layer terms. Each layer's trials
    are costed in one jitted call.
    """
    g = np.array((self.gene_sizes - 1) if largest else np.zeros_like(self.gene_sizes), np.int32)
    choices = [i for i, b in enumerate(self.cfg.blocks) if b != 'skip' or allow_skip]
    for layer in range(self.num_layers):
      gene = GLOBAL_GENES + layer * LAYER_GENES
      trials = np.repeat(g[None], len(choices), axis=0)
      trials[:, gene] = choices
      values = np.asarray(self.genome_costs(trials, limits)[cost], np.float64)
      g[gene] = choices[int(np.argmax(values) if largest else np.argmin(values))]
    return g

  def genome_costs(self, genomes_NxG, limits: Limits | None = None) -> dict[str, np.ndarray]:
    """`cost()` of each genome's arch (numpy, one row per genome), one jitted call. Compiled once
    per equal space (`key()`) and power-of-two batch size, so a handful of sizes compile however
    many spaces and batches a job makes (eager decoding compiled every primitive of it, seconds
    at every command's start); zero genomes (every gene's first choice) fill the padding."""
    return self.padded_call(lambda g: _genome_costs(self, g, limits), genomes_NxG)

  def decode_genomes(self, genomes_NxG) -> Arch:
    """Host convenience: the archs of genomes, one `Arch` of NumPy arrays [N, ...], one jitted
    call (padded batches, `padded_call`)."""
    return self.padded_call(functools.partial(_decode_genomes, self), genomes_NxG)

  def padded_call(self, fn, genomes_NxG):
    """`fn` (a jitted function of an [N, G] genome batch) on `genomes_NxG` padded to a
    power-of-two batch (at least 8) with zero genomes (every gene's first choice), so a handful of
    batch sizes compile; numpy outputs for the real rows."""
    genomes_NxG = np.asarray(genomes_NxG, np.int32).reshape(-1, self.num_genes)
    n = genomes_NxG.shape[0]
    padded = np.zeros((max(8, 1 << max(n - 1, 0).bit_length()), self.num_genes), np.int32)
    padded[:n] = genomes_NxG
    return jax.tree.map(lambda x: np.asarray(x)[:n], fn(padded))

  def key(self) -> tuple:
    """What the space's functions depend on (hashable): equal keys, equal computations."""
    return (self.model, self.cfg, self.seq_len)

  # Equal by key: a static argument of jitted functions, compiled once however many Space
  # objects a job makes of the same configuration.
  def __eq__(self, other):
    return isinstance(other, Space) and self.key() == other.key()

  def __hash__(self):
    return hash(self.key())

  def largest(self, limits: Limits | None = None) -> Arch:
    """The arch with the most parameters (the sandwich rule's teacher)."""
    return self.decode(self.extreme_genome(True, limits=limits), limits)

  def smallest(self, limits: Limits | None = None) -> Arch:
    """The smallest network of the sandwich rule (whittle's): every dimension at its smallest,
    the shallowest depth, each kept layer the lightest block type that computes ('skip' aside)."""
    return self.decode(self.extreme_genome(False, limits=limits), limits)

  def fewest_params(self) -> Arch:
    """The arch with the fewest parameters in the space ('skip' allowed: layers may vanish)."""
    return self.decode(self.extreme_genome(False, allow_skip=True))

  def sample(self, key: jax.Array, n: int, *, max_params: int | None = None) -> Arch:
    """n archs (a batched Arch), uniform per gene; with `max_params`, uniform among those under
    the budget (rejection sampling, vectorised; raises UserError if the budget is infeasible)."""
    if max_params is None:
      return jax.tree.map(jnp.asarray, self.decode_genomes(self.random_genomes(key, n)))
    smallest = int(self.cost(self.fewest_params())['params'])
    if max_params < smallest:
      raise UserError(f'parameter budget {max_params:,} is below the smallest architecture of '
                      f'the space ({smallest:,} parameters); raise the budget')
    found, need = [], n
    for attempt in range(64):
      key, sub = jax.random.split(key)
      genomes = self.random_genomes(sub, max(4 * need, 64))
      ok = self.genome_costs(genomes)['params'] <= max_params
      found.extend(np.asarray(genomes)[ok][:need])
      need = n - len(found)
      if need <= 0:
        return jax.tree.map(jnp.asarray, self.decode_genomes(np.stack(found)))
      del attempt
    raise UserError(f'could not sample {n} architectures under {max_params:,} parameters: the '
                    'budget admits too small a share of the space; raise it')

  # -- costs and size of the space ---------------------------------------------------------
  def cost(self, arch: Arch) -> dict:
    return arch_cost(self.model, arch, bottleneck_head_dim=self.cfg.bottleneck_head_dim,
                     seq_len=self.seq_len)

  def parameter_range(self) -> tuple[int, int]:
    """Parameters of `fewest_params()` and of `largest()`."""
    low, high = np.asarray(self.genome_costs(np.stack([
        self.extreme_genome(False, allow_skip=True), self.extreme_genome(True)]))['params'])
    return int(low), int(high)

  def num_architectures(self) -> int:
    """Distinct architectures: for each depth, the product of per-layer options over the kept
    layers (a layer beyond `depth` has no effect and a 'skip' layer has no settings, so neither
    is counted twice)."""
    s = self.cfg
    lim = jax.tree.map(np.asarray, self.limits)
    per_layer = []
    for layer in range(self.num_layers):
      count = 0
      for i, b in enumerate(s.blocks):
        heads = self.tables['heads'][lim.heads_ok[layer, i]]
        n_ffn = max(int(np.sum(self.tables['ffn'] <= lim.ffn_max[layer, i])), 1)
        kv_options = sum(len([g for g in s.kv_groups if h % g == 0]) if s.kv_groups else 1
                         for h in heads)
        if b == 'transformer':
          count += kv_options * n_ffn
        elif b == 'bottleneck':
          count += kv_options * n_ffn * len(s.inner)
        elif b in FLEXIBERT_BLOCKS:
          count += len(heads) * n_ffn * len(s.ffn_layers)
        else:
          count += 1
      per_layer.append(count)
    scone = math.prod(len(self.tables[f]) for f in SCONE_GENES)
    return (len(s.hidden) * len(s.head_dim) * scone
            * sum(math.prod(per_layer[:d]) for d in s.depth))

  def describe(self) -> dict:
    lo, hi = self.parameter_range()
    return {
        'architectures': self.num_architectures(),
        'log10_architectures': round(math.log10(self.num_architectures()), 2),
        'genes': self.num_genes,
        'params_min': lo,
        'params_max': hi,
        'smallest': arch_lib.to_json(self.smallest()),
        'largest': arch_lib.to_json(self.largest()),
    }


@functools.partial(jax.jit, static_argnums=0)
def _genome_costs(space: Space, genomes_NxG: jax.Array, limits: Limits | None) -> dict:
  return jax.vmap(lambda g: space.cost(space.decode(g, limits)))(genomes_NxG)


@functools.partial(jax.jit, static_argnums=0)
def _decode_genomes(space: Space, genomes_NxG: jax.Array) -> Arch:
  return jax.vmap(space.decode)(genomes_NxG)
