"""Which sub-networks a training step trains: the sampling strategies, as data.

Every strategy returns a batched `Arch` with a fixed number K of archs, so a step trains any
sub-networks without retracing; draws are a function of (seed, step) only, so a resumed run
samples exactly what an uninterrupted one would.

- standard:      [largest]                                  (K = 1)
- random:        [one uniform arch]                          (K = 1)
- sandwich:      [largest, smallest, N uniform archs]         (K = 2 + N; whittle's default)
- random_linear: [uniform arch with probability p(step), else the largest], p ramping 0 -> 1
                 linearly over `ramp_steps`                  (K = 1)
- fixed:         [the given arch] (train one architecture, e.g. found by training-free search)
- stratified:    [largest, smallest, N archs spread over parameter counts] (K = 2 + N; whittle's
                 parameter-stratified sampling: the N come from random bins of equal width over
                 the space's parameter range, so small and large models are drawn equally often,
                 unlike uniform genes, which concentrate on middle sizes)
- anchored:      [the A given archs, N archs spread over the parameter counts they span]
                 (K = A + N; a compression run's sampler: the anchors are one model per budget
                 (compress.anchors), so every step trains the shapes the exported models start
                 from and N sub-networks of sizes between them, not sub-networks far from every
                 budget; a single anchor's span reaches down to ANCHOR_REACH of its size, where
                 the search's best-under-budget models lie)

With ELM's dynamic modules (elastic_jax/train/dynamic/) the space's limits change during training:
the step passes them in as data (`Allowed`: the limits, and the largest and smallest archs within
them), so a changed space never retraces.

The first arch of `standard`, `sandwich`, `stratified` and `random_linear` (when it is the
largest) is the in-place distillation teacher of the others; `anchored` trains no largest
network, so it distils from an external teacher (train.distill.teacher) or not at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from elastic_jax import arch as arch_lib
from elastic_jax.arch import Arch
from elastic_jax.errors import UserError
from elastic_jax.space import Limits, Space

STRATEGIES = ('standard', 'random', 'sandwich', 'random_linear', 'fixed', 'stratified',
              'anchored')
STRATIFIED_BINS = 8
ANCHOR_REACH = 0.8  # anchored, one anchor: the random archs' sizes from this fraction of its


def num_archs(strategy: str, num_random: int, num_anchors: int = 0) -> int:
  if strategy not in STRATEGIES:
    raise UserError(f'config field train.sampling={strategy!r} is invalid; allowed values are '
                    f'{list(STRATEGIES)}')
  if strategy == 'anchored':
    return num_anchors + num_random
  return 2 + num_random if strategy in ('sandwich', 'stratified') else 1


def teacher_is_first(strategy: str) -> bool:
  """Whether archs[0] is the largest network in every step (the in-place KD teacher)."""
  return strategy in ('standard', 'sandwich', 'stratified')


@struct.dataclass
class Allowed:
  """The part of the space a step may sample (arrays; see elastic_jax/space.py's `Limits`)."""

  limits: Limits
  largest: Arch
  smallest: Arch


class Sampler:
  """Draws the K archs of a step: `sampler(key, step) -> Arch[K]` (jittable)."""

  def __init__(self, space: Space, strategy: str, num_random: int = 2, ramp_steps: int = 1000,
               fixed: Arch | None = None, anchors: list[Arch] | None = None):
    self.space = space
    self.strategy = strategy
    if strategy == 'anchored' and not anchors:
      raise UserError("train.sampling='anchored' needs architectures to train every step: set "
                      '--config.train.anchor_archs=ARCHS.jsonl (JSON lines as `elastic-jax '
                      'sample` prints them)')
    self.anchors = arch_lib.stack(anchors) if strategy == 'anchored' else None
    self.num_anchors = len(anchors) if strategy == 'anchored' else 0
    self.k = num_archs(strategy, num_random, self.num_anchors)
    self.num_random = num_random
    self.ramp_steps = max(int(ramp_steps), 1)
    self.largest = space.largest()
    self.smallest = space.smallest()
    if strategy == 'fixed' and fixed is None:
      raise UserError("train.sampling='fixed' needs an architecture: set --config.train.arch="
                      'ARCH.json')
    self.fixed = fixed
    self.param_range = None
    if strategy == 'stratified':
      self.param_range = tuple(float(p) for p in space.parameter_range())
    elif strategy == 'anchored':
      params = [float(space.cost(a)['params']) for a in anchors]
      floor = float(space.parameter_range()[0])
      low = min(params) if len(params) > 1 else max(ANCHOR_REACH * params[0], floor)
      self.param_range = (low, max(params))

  @property
  def labels(self) -> tuple[str, ...]:
    """A name for each of the K positions (how the training metrics name per-arch losses)."""
    if self.strategy in ('sandwich', 'stratified'):
      return ('largest', 'smallest') + tuple(f'random{i}' for i in range(self.num_random))
    if self.strategy == 'anchored':
      return (tuple(f'anchor{i}' for i in range(self.num_anchors))
              + tuple(f'random{i}' for i in range(self.num_random)))
    return {'standard': ('largest',), 'fixed': ('fixed',), 'random': ('random',),
            'random_linear': ('sampled',)}[self.strategy]

  def static_archs(self) -> tuple[Arch, ...]:
    """The archs at the leading positions of every step's draw, the same in every step (without
    `allowed`): the sandwich's largest and smallest, the fixed arch, the anchors; () where the
    first is drawn."""
    if self.strategy == 'standard':
      return (self.largest,)
    if self.strategy in ('sandwich', 'stratified'):
      return (self.largest, self.smallest)
    if self.strategy == 'fixed':
      return (self.fixed,)
    if self.strategy == 'anchored':
      return tuple(arch_lib.unstack(self.anchors))
    return ()

  def allowed(self, limits: Limits) -> Allowed:
    """`Allowed` of the space within `limits` (host side; int32 / bool arrays)."""
    if self.strategy in ('stratified', 'fixed', 'anchored'):
      raise UserError(f'train.sampling={self.strategy!r} cannot follow a space that changes in '
                      "training (train.dynamic); use 'sandwich', 'random', 'standard' or "
                      "'random_linear'")
    limits = jax.tree.map(jnp.asarray, limits)
    return Allowed(limits=limits, largest=self.space.largest(limits),
                   smallest=self.space.smallest(limits))

  def _uniform(self, key, n, limits=None) -> Arch:
    return jax.vmap(lambda g: self.space.decode(g, limits))(
        self.space.random_genomes(key, n, limits))

  def _stratified(self, key, n) -> Arch:
    """n archs from equal-width parameter bins over `param_range`; candidates outside the range
    are drawn only when too few fall inside it (rare: 8 n uniform candidates are proposed)."""
    from elastic_jax.search.baselines import stratified_random_search  # noqa: PLC0415
    params = lambda genomes: jax.vmap(lambda g: self.space.cost(self.space.decode(g))['params'])(
        genomes)
    lo, hi = self.param_range

    def inside(genomes):
      p = params(genomes)
      return (p >= lo) & (p <= hi)
    # `stratified`'s range is the whole space's, which every candidate is inside: no filter.
    genomes, _ = stratified_random_search(
        key, jnp.asarray(self.space.gene_sizes), n, params, STRATIFIED_BINS,
        feasible_fn=inside if self.strategy == 'anchored' else None,
        value_range=self.param_range)
    return jax.vmap(self.space.decode)(genomes)

  def __call__(self, key: jax.Array, step, allowed: Allowed | None = None) -> Arch:
    key = jax.random.fold_in(key, step)
    if allowed is not None:
      largest, smallest = allowed.largest, allowed.smallest
      uniform = lambda k, n: self._uniform(k, n, allowed.limits)
    else:
      largest, smallest, uniform = self.largest, self.smallest, self._uniform
    if self.strategy == 'standard':
      return arch_lib.stack([largest])
    if self.strategy == 'fixed':
      return arch_lib.stack([self.fixed])
    if self.strategy == 'random':
      return uniform(key, 1)
    if self.strategy in ('sandwich', 'stratified', 'anchored'):
      ends = (self.anchors if self.strategy == 'anchored'
              else arch_lib.stack([largest, smallest]))
      if not self.num_random:
        return ends
      draw = uniform if self.strategy == 'sandwich' else self._stratified
      return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ends,
                          draw(key, self.num_random))
    # random_linear
    k_pick, k_arch = jax.random.split(key)
    p = jnp.minimum(jnp.asarray(step, jnp.float32) / self.ramp_steps, 1.0)
    use_random = jax.random.uniform(k_pick) < p
    rand = uniform(k_arch, 1)
    big = arch_lib.stack([largest])
    return jax.tree.map(lambda r, b: jnp.where(use_random, r, b), rand, big)
