"""The compiled search loop, shared by every strategy and by both entry points.

`advance` runs `spec.length` generations under `jax.lax.scan` inside one `jax.jit`: the loop never
returns to Python, so a search costs one compile however many generations it has, and the fitness
function (the expensive part, e.g. a population forward through the supernet) is traced exactly
once. Generation g uses the key `fold_in(key, g)`, and generations past `n_active` are skipped
with `lax.cond`, so a search split into several calls (checkpoints, resumes) reuses one program
and continues exactly as one uninterrupted call would. The jit is keyed on `LoopSpec` (the
strategy, the functions, the sizes, the hyper-parameters); arrays the fitness reads (a
supernet's state, validation batches) are the `data` argument, never constants.

`Searcher` drives `advance` a few generations per call (the search job checkpoints in between);
`run_evolution` runs a whole search of a plain `evaluate_fn(genomes) -> fitness` in one call.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import distributed
from elastic_jax.errors import UserError
from elastic_jax.search import evolution, nsga2, operators
from elastic_jax.search import state as state_lib
from elastic_jax.search.hypervolume import hypervolume_2d

STRATEGIES: dict[str, Callable[..., state_lib.SearchState]] = {
    "nsga2": nsga2.nsga2_step,
    "regularized": evolution.evolution_step,
    "ga": evolution.ga_step,
    "random": evolution.random_step,
    "stratified": evolution.stratified_step,
}


class SearchResult(NamedTuple):
  """Final state and per-generation history (T = generations).

  Attributes:
    state: the final `SearchState` (population, fitness, feasibility, best-so-far records).
    best_TxM: best feasible value of each objective evaluated up to and including generation t.
    hypervolume_T: 2-D hypervolume of the feasible population after generation t, or None unless
      M == 2 and a reference point was given.
    n_evals_T: distinct genomes evaluated up to and including generation t.
  """

  state: state_lib.SearchState
  best_TxM: jax.Array
  hypervolume_T: jax.Array | None
  n_evals_T: jax.Array


def default_n_children(strategy: str, pop_size: int) -> int:
  """Children per generation when not given: P, except B = P // 4 for aging evolution."""
  return max(1, pop_size // 4) if strategy == "regularized" else pop_size


class LoopSpec(NamedTuple):
  """Everything static about a compiled search loop (hashable: the jit cache key).

  `evaluate_fn(genomes_NxG, data, active_N) -> float[N, M]` (minimised; rows where active_N
  is False are never read and may be skipped), `feasible_fn(genomes) -> bool[N]`
  and `key_fn(genomes) -> int32[N, K]` (dedupe keys) are compared by equality: give them value
  semantics (frozen dataclasses) to share programs between equal searches.
  """

  strategy: str
  evaluate_fn: Callable[[jax.Array, Any], jax.Array]
  feasible_fn: Any
  key_fn: Any
  pop_size: int
  n_children: int
  kwargs: tuple
  length: int  # generations per compiled call


@functools.partial(jax.jit, static_argnames=("spec",))
def advance(state, base_key, start, n_active, data, *, spec: LoopSpec):
  """`spec.length` generations from generation `start`; those at i >= n_active are skipped.

  Returns (state, history) where history holds, per generation: best [M], n_evals, and the
  population after it (genomes [P, G], fitness [P, M], mask [P] = occupied and feasible).
  """

  def step(state, key):
    evaluate = state_lib.MaskedEvaluate(
        lambda children_NxG, active_N: spec.evaluate_fn(children_NxG, data, active_N))
    return STRATEGIES[spec.strategy](state, key, evaluate, feasible_fn=spec.feasible_fn,
                                     n_children=spec.n_children, key_fn=spec.key_fn,
                                     **dict(spec.kwargs))

  def generation(state, i):
    key = jax.random.fold_in(base_key, start + i)
    state = jax.lax.cond(i < n_active, step, lambda s, k: s, state, key)
    return state, {"best": state.best_M, "n_evals": state.n_evals,
                   "genomes": state.genomes_PxG, "fitness": state.fitness_PxM,
                   "mask": state.occupied_P & state.feasible_P}

  return jax.lax.scan(generation, state, jnp.arange(spec.length))


class Searcher:
  """A strategy bound to a fitness and constraint, run a few generations per compiled call.

  `advance(state, key, start, count, data)` runs generations [start, start + count) and returns
  the new state and per-generation host arrays (see `advance`). Every call reuses one compiled
  program (for a given `generations_per_call`). `archive_size` rows of the state remember the
  evaluated genomes (see `state.SearchState`).
  """

  def __init__(self, evaluate_fn, gene_sizes, n_objectives: int, strategy: str, *,
               pop_size: int, n_children: int | None = None, feasible_fn=None, key_fn=None,
               generations_per_call: int = 5, archive_size: int = 0, data=None, **kwargs):
    if strategy not in STRATEGIES:
      raise UserError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    self.gene_sizes = jnp.asarray(gene_sizes, jnp.int32)
    self.n_objectives = int(n_objectives)
    self.archive_size = int(archive_size)
    self.data = data
    n_children = n_children or default_n_children(strategy, pop_size)
    if self.archive_size and self.archive_size < n_children:
      raise UserError(f"search.archive_size={archive_size} must be 0 or at least the children "
                      f"per generation ({n_children})")
    self.spec = LoopSpec(strategy, evaluate_fn, feasible_fn or None, key_fn, pop_size,
                         n_children, tuple(sorted(kwargs.items())), generations_per_call)

  @property
  def warmup_generations(self) -> int:
    """Generations that fill the empty population with uniform random genomes."""
    return math.ceil(self.spec.pop_size / self.spec.n_children)

  def init_state(self, seeds_SxG=None, fitness_SxM=None) -> state_lib.SearchState:
    """An empty population, or one holding already evaluated `seeds` (minimised `fitness`) in
    its first slots; the first generations fill the rest with random genomes. Seeds count as
    evaluations and enter the archive."""
    shape = (0, self.gene_sizes.shape[0])
    seeds_SxG = np.zeros(shape, np.int32) if seeds_SxG is None else np.asarray(seeds_SxG)
    fitness_SxM = (np.zeros((0, self.n_objectives)) if fitness_SxM is None
                   else np.asarray(fitness_SxM))
    pop = self.spec.pop_size
    return _initial_state(self.gene_sizes, seeds_SxG[:pop].astype(np.int32),
                          fitness_SxM[:pop].astype(np.float32), pop_size=pop,
                          archive_size=self.archive_size, key_fn=self.spec.key_fn)

  def advance(self, state, key, start: int, count: int, data=None):
    data = self.data if data is None else data
    outs = []
    done = 0
    while done < count:
      n = min(self.spec.length, count - done)
      state, out = advance(state, key, jnp.int32(start + done), jnp.int32(n), data,
                           spec=self.spec)
      outs.append(jax.tree.map(lambda x, n=n: distributed.to_host(x)[:n], out))
      done += n
    history = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    # The state back on the host: small, and the same on every process of a multi-process run
    # (the next call takes it as replicated input, whatever layout XLA chose for the output).
    return jax.tree.map(lambda x: jnp.asarray(distributed.to_host(x)), state), history


@functools.partial(jax.jit, static_argnames=('pop_size', 'archive_size', 'key_fn'))
def _initial_state(gene_sizes_G, seeds_SxG, fitness_SxM, *, pop_size: int, archive_size: int,
                   key_fn) -> state_lib.SearchState:
  """`Searcher.init_state` as one program (op by op, a seeded one compiled some thirty)."""
  n, m = fitness_SxM.shape
  state = state_lib.init_state(gene_sizes_G, pop_size, m, archive_size)
  if n == 0:
    return state
  best = jnp.argmin(fitness_SxM, axis=0)
  state = state._replace(
      genomes_PxG=state.genomes_PxG.at[:n].set(seeds_SxG),
      fitness_PxM=state.fitness_PxM.at[:n].set(fitness_SxM),
      feasible_P=state.feasible_P.at[:n].set(True),
      birth_P=state.birth_P.at[:n].set(jnp.arange(n, dtype=jnp.int32)),
      best_M=jnp.min(fitness_SxM, axis=0), best_genomes_MxG=seeds_SxG[best])
  keys_SxG = seeds_SxG if key_fn is None else key_fn(seeds_SxG)
  return state_lib.archive_insert(state, keys_SxG, fitness_SxM, jnp.ones((n,), bool))


@dataclasses.dataclass(frozen=True)
class _Unary:
  """`evaluate_fn(genomes)` as the loop's `evaluate_fn(genomes, data)` (equal by identity).

  Jitted, so that the shape probe in `run_evolution` and the loop share one trace of `fn`."""

  fn: Callable[[jax.Array], jax.Array]

  def __call__(self, genomes_NxG, data, active_N=None):
    del data, active_N
    return jax.jit(self.fn)(genomes_NxG)


_hypervolumes_2d = jax.jit(jax.vmap(hypervolume_2d, in_axes=(0, None, 0)))


def run_evolution(
    key: jax.Array,
    strategy: str,
    gene_sizes: jax.Array,
    evaluate_fn: state_lib.EvaluateFn,
    feasible_fn: operators.FeasibleFn | None = None,
    generations: int = 40,
    *,
    pop_size: int = 50,
    n_children: int | None = None,
    ref_point: jax.Array | None = None,
    archive_size: int | None = None,
    **strategy_kwargs,
) -> SearchResult:
  """Runs `generations` generations of `strategy` from an empty population, in one call.

  The first ceil(pop_size / n_children) generations sample uniform random feasible genomes to
  fill the population, then the strategy takes over; `n_children` genomes are proposed per
  generation, and those already evaluated are resampled, so no genome is evaluated twice (the
  archive holds `archive_size` genomes, default every one the run can evaluate).
  `evaluate_fn(int32[B, G]) -> float[B, M]` (all minimised) and `feasible_fn(int32[B, G]) ->
  bool[B]` must be jittable and are compared by identity for the compile cache.
  `strategy_kwargs` (Python scalars) go to the step function, e.g. mutation_prob,
  crossover_prob, sample_size, top_k, objective, tries.
  """
  if strategy not in STRATEGIES:
    raise UserError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
  if generations < 1 or pop_size < 1:
    raise UserError(f"generations and pop_size must be >= 1, got {generations}, {pop_size}")
  gene_sizes = jnp.asarray(gene_sizes, jnp.int32)
  if gene_sizes.ndim != 1:
    raise UserError(f"gene_sizes must be int32[G], got shape {gene_sizes.shape}")
  if not isinstance(gene_sizes, jax.core.Tracer) and bool(jnp.any(gene_sizes < 1)):
    raise UserError(f"every gene needs at least one choice; gene_sizes = {gene_sizes}")
  n_children = default_n_children(strategy, pop_size) if n_children is None else n_children
  evaluate = _Unary(evaluate_fn)
  out = jax.eval_shape(evaluate, jax.ShapeDtypeStruct((n_children, gene_sizes.shape[0]),
                                                      jnp.int32), None)
  if len(out.shape) != 2 or out.shape[0] != n_children:
    raise UserError(
        f"evaluate_fn must map int32[{n_children}, G] to float[{n_children}, M]; got {out.shape}")
  if archive_size is None:
    archive_size = generations * n_children
  searcher = Searcher(evaluate, gene_sizes, out.shape[1], strategy,
                      pop_size=pop_size, n_children=n_children, feasible_fn=feasible_fn,
                      generations_per_call=generations, archive_size=archive_size,
                      **strategy_kwargs)
  state, history = advance(searcher.init_state(), key, jnp.int32(0), jnp.int32(generations),
                           None, spec=searcher.spec)
  hv = None
  if ref_point is not None and out.shape[1] == 2:
    hv = _hypervolumes_2d(history["fitness"], jnp.asarray(ref_point, jnp.float32),
                          history["mask"])
  return SearchResult(state, history["best"], hv, history["n_evals"])
