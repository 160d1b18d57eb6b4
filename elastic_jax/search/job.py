"""The search job: an experiment config and a trained supernet in, a Pareto front out.

  run_search(cfg, workdir) -> dict

writes W/search/:
  pareto.json     the final front (genome, arch, every objective and cost, measured latency of the
                  exported dense model), the baselines, the settings
  history.jsonl   one line per generation: evaluations, best value of each objective, hypervolume
  pareto.png      the front with random architectures and the smallest / largest archs
  summary.md      the same as a readable report
  state.npz       the search checkpoint (population, generation, key, history)

Generations run inside one jitted `lax.scan` of `search.checkpoint_every` generations (the last
call masks the generations past the end with `lax.cond`, so it reuses the same program): the
fitness, a forward pass of the whole population through the supernet, is traced and compiled once
per run, however many generations and checkpoints. The supernet's state and the validation batches
are arguments of that jitted function, not constants. Generation g uses the key
`fold_in(key(seed), g)`, so a run resumed from its checkpoint continues exactly as an uninterrupted
run would have, and a finished run given more generations continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from elastic_jax import atomic
from elastic_jax.errors import UserError
from elastic_jax.search import baselines, driver, nsga2, operators
from elastic_jax.search import fitness as fitness_lib
from elastic_jax.search import state as state_lib
from elastic_jax.search.fitness import (
    REPORT_METRICS,
    Budgets,
    Fitness,
    FitnessFn,
    canonical_genomes,
    extreme_genome,
    space_key,
)
from elastic_jax.search.hypervolume import hypervolume_nd, pareto_front_mask

SEARCH_DIR = 'search'
CHECKPOINT_FILE = 'state.npz'
STRATEGY_NAMES = ('auto', 'nsga2', 'regularized', 'ga', 'random', 'stratified')


def default_config() -> ml_collections.ConfigDict:
  """The `search` section of an experiment config (cfg.search), every field commented."""
  c = ml_collections.ConfigDict()
  # What to optimise, all at once (a Pareto front for two or more). Every name is minimised except
  # 'accuracy' (maximised; the search minimises its negation). Names:
  #   'loss', 'perplexity', 'accuracy'   on the fixed validation batches, with the supernet's
  #                                      inherited weights (one forward of the population)
  #   'params', 'flops', 'train_flops', 'kv_cache', 'activation_memory', 'param_bytes'
  #                                      analytic, from the arch alone (see elastic_jax/cost.py)
  #   more (e.g. zero-cost proxies) via elastic_jax.search.fitness.register_objective.
  c.objectives = ('loss', 'params')
  # Training-free search (the W-PCA paper's): a zero-cost proxy to maximise, e.g. 'wpca'. It
  # replaces `objectives` with (fitness,), picks the W-PCA paper's genetic algorithm when
  # strategy is 'auto' ('ga': uniform crossover, per-gene mutation 0.1, parents from the top
  # fifth) and its population 50 x 40 generations unless pop_size / generations are set; give it
  # a parameter budget (budgets.params). '' = search `objectives`. A search whose objectives are
  # all zero-cost proxies or analytic costs scores the supernet's seeded initialisation and needs
  # no training (then `elastic-jax train --config.train.arch=ARCH.json` trains what it found).
  c.fitness = ''
  # 'auto' (nsga2 for two or more objectives, regularized for one), 'nsga2', 'regularized'
  # (aging evolution), 'ga' (the W-PCA genetic algorithm), 'random', 'stratified' (random,
  # spread evenly over parameter counts). Single-objective strategies optimise objectives[0].
  c.strategy = 'auto'
  # Generations; each evaluates n_children architectures. 0 = 30 (40 with `fitness`).
  c.generations = 0
  # Population size. 0 = 32 (50 with `fitness`).
  c.pop_size = 0
  # Architectures evaluated per generation; 0 = pop_size (pop_size // 4 for 'regularized').
  c.n_children = 0
  # Upper bounds on analytic costs; 0 = no budget. Infeasible architectures are never proposed.
  c.budgets = ml_collections.ConfigDict()
  c.budgets.params = 0.0  # parameters
  c.budgets.flops = 0.0  # forward FLOPs per token
  c.budgets.kv_cache = 0.0  # KV-cache bytes per token
  c.budgets.activation_memory = 0.0  # activation bytes per token kept for backward
  # Architectures run together in the population forward: 1 runs them one at a time inside the
  # compiled call (removed layers and FFN blocks are skipped: best on CPU); k > 1 vmaps k at a
  # time (every layer runs at full size, masked; better accelerator utilisation, more memory).
  c.chunk = 1
  # Generations per compiled call; the checkpoint (W/search/state.npz) is written after each.
  c.checkpoint_every = 5
  # Continue from W/search/state.npz when it exists (it must come from the same search
  # settings); False starts over and overwrites it.
  c.resume = True
  # Hypervolume reference point, one natural-unit value per objective (worse than any point of
  # interest); () = automatic: for costs 1.1 x the space's largest value; for the loss (and
  # objectives without an analytic worst value) the worse of the smallest and largest
  # architectures' values plus 10% of their gap.
  c.ref_point = ()
  # Strategy settings; 0 = the strategy's own default.
  c.mutation_prob = 0.0  # per-gene change rate (nsga2 0.1, ga 0.1, regularized one gene)
  c.crossover_prob = 0.9  # nsga2: probability that a pair recombines
  c.sample_size = 0  # regularized: tournament size (default min(10, pop_size))
  c.top_k = 0  # ga: parents drawn from the top k (default pop_size // 5)
  c.tries = 4  # candidates proposed per child, to find feasible, new ones
  c.stratify_bins = 8  # stratified: parameter-count bins
  # Start the population with the smallest and largest architectures (those within the budgets):
  # the two ends of the front, which random proposals rarely hit. They count as evaluations.
  c.seed_extremes = True
  # Seed of the search; -1 = the config's top-level seed.
  c.seed = -1
  # Measure the latency of each exported dense front member on this device (jit once per model,
  # median of `latency_repeats` forwards of one validation batch), at most `latency_max` of them
  # (evenly spaced along the front).
  c.latency = True
  c.latency_max = 24
  c.latency_repeats = 5
  # Search the untrained initialisation when the workdir has no trained supernet (smoke tests
  # only: the front is then meaningless). False: a clear error asks to run `train` first.
  c.allow_untrained = False
  # What `elastic-jax run` exports from the front: 'knee', 'index:N' or 'best-under:params=N'.
  c.export_pick = 'knee'
  return c


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """The validated `search` section (see `default_config` for the meaning of each field)."""

  objectives: tuple[str, ...]
  fitness: str
  strategy: str
  generations: int
  pop_size: int
  n_children: int
  budgets: tuple[tuple[str, float], ...]
  chunk: int
  checkpoint_every: int
  resume: bool
  ref_point: tuple[float, ...]
  mutation_prob: float
  crossover_prob: float
  sample_size: int
  top_k: int
  tries: int
  seed_extremes: bool
  stratify_bins: int
  seed: int
  latency: bool
  latency_max: int
  latency_repeats: int
  allow_untrained: bool
  export_pick: str


def search_config(cfg: ml_collections.ConfigDict | Mapping) -> SearchConfig:
  """`cfg.search` merged over `default_config()` and validated (cfg may lack the section)."""
  merged = default_config().to_dict()
  given = cfg.get('search', None) if hasattr(cfg, 'get') else None
  given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given or {})
  unknown = sorted(set(given) - set(merged))
  if unknown:
    raise UserError(f'search.{unknown[0]} is not a search config field; known fields: '
                    f'{", ".join(sorted(merged))}')
  budgets = dict(merged.pop('budgets'))
  budgets.update(given.pop('budgets', None) or {})
  merged.update(given)
  seed = int(merged['seed'])
  if seed < 0:
    seed = int(cfg.get('seed', 0)) if hasattr(cfg, 'get') else 0
  objectives = merged['objectives']
  if isinstance(objectives, str):
    objectives = tuple(o.strip() for o in objectives.split(',') if o.strip())
  fitness = str(merged['fitness'] or '')
  if fitness:
    from elastic_jax.proxies import PROXIES  # noqa: PLC0415
    if fitness not in PROXIES or fitness == 'params':
      raise UserError(f'search.fitness is {fitness!r}, not a zero-cost proxy; use one of '
                      f'{", ".join(p for p in PROXIES if p != "params")} (or leave it empty '
                      'and set search.objectives)')
    objectives = (fitness,)
  paper = bool(fitness)  # the W-PCA paper's population and generations
  sc = SearchConfig(
      objectives=tuple(objectives), fitness=fitness, strategy=str(merged['strategy']),
      generations=int(merged['generations']) or (40 if paper else 30),
      pop_size=int(merged['pop_size']) or (50 if paper else 32),
      n_children=int(merged['n_children']),
      budgets=tuple(sorted((k, float(v)) for k, v in budgets.items() if v)),
      chunk=int(merged['chunk']), checkpoint_every=int(merged['checkpoint_every']),
      resume=bool(merged['resume']), ref_point=tuple(float(v) for v in merged['ref_point']),
      mutation_prob=float(merged['mutation_prob']),
      crossover_prob=float(merged['crossover_prob']), sample_size=int(merged['sample_size']),
      top_k=int(merged['top_k']), tries=int(merged['tries']),
      seed_extremes=bool(merged['seed_extremes']),
      stratify_bins=int(merged['stratify_bins']), seed=seed, latency=bool(merged['latency']),
      latency_max=int(merged['latency_max']), latency_repeats=int(merged['latency_repeats']),
      allow_untrained=bool(merged['allow_untrained']), export_pick=str(merged['export_pick']))
  if sc.strategy not in STRATEGY_NAMES:
    raise UserError(f'search.strategy is {sc.strategy!r}; use one of {", ".join(STRATEGY_NAMES)}')
  for name, low in (('generations', 1), ('pop_size', 2), ('n_children', 0), ('chunk', 1),
                    ('checkpoint_every', 1), ('tries', 1), ('stratify_bins', 1),
                    ('latency_max', 0), ('latency_repeats', 1), ('sample_size', 0),
                    ('top_k', 0)):
    if getattr(sc, name) < low:
      raise UserError(f'search.{name} must be >= {low}, got {getattr(sc, name)}')
  if sc.n_children > sc.pop_size and resolve_strategy(sc) in ('regularized', 'ga'):
    raise UserError(f'search.n_children={sc.n_children} must be <= search.pop_size='
                    f'{sc.pop_size} for strategy {resolve_strategy(sc)!r}')
  if not 0.0 <= sc.mutation_prob <= 1.0 or not 0.0 <= sc.crossover_prob <= 1.0:
    raise UserError('search.mutation_prob and search.crossover_prob must be in [0, 1]')
  return sc


def resolve_strategy(sc: SearchConfig) -> str:
  if sc.strategy != 'auto':
    return sc.strategy
  if sc.fitness:
    return 'ga'
  return 'nsga2' if len(sc.objectives) >= 2 else 'regularized'


def n_children_of(sc: SearchConfig) -> int:
  strategy = resolve_strategy(sc)
  return sc.n_children or driver.default_n_children(strategy, sc.pop_size)


# -- strategies ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamsOf:
  """genomes -> float32[B] parameter counts (a static jit argument, equal by the space's key)."""

  space: Any = dataclasses.field(compare=False, repr=False)
  space_key: tuple = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, 'space_key', space_key(self.space))

  def __call__(self, genomes_BxG):
    cost = jax.vmap(lambda g: self.space.cost(self.space.decode(g)))(genomes_BxG)
    return cost['params'].astype(jnp.float32)


def stratified_step(
    state: state_lib.SearchState,
    key: jax.Array,
    evaluate_fn: state_lib.EvaluateFn,
    *,
    feasible_fn: operators.FeasibleFn | None = None,
    n_children: int | None = None,
    stratify_fn: Callable[[jax.Array], jax.Array],
    n_bins: int = 8,
    value_range: tuple[float, float] | None = None,
    tries: int = 8,
) -> state_lib.SearchState:
  """Stratified random search as a strategy: each generation's children spread evenly over bins
  of `stratify_fn` (e.g. parameter count); the population is the NSGA-II elitist archive, as in
  `evolution.random_step`, so both random baselines are judged like the evolutionary strategies."""
  p = state.genomes_PxG.shape[0]
  n = p if n_children is None else n_children
  children_NxG, valid_N = baselines.stratified_random_search(
      key, state.gene_sizes_G, n, stratify_fn, n_bins, feasible_fn, tries, value_range)
  valid_N &= ~operators.is_duplicate(children_NxG, state.genomes_PxG, valid_N, state.occupied_P)
  feasible_N = (jnp.ones((n,), bool) if feasible_fn is None
                else jnp.asarray(feasible_fn(children_NxG), bool))
  state, fitness_NxM, feasible_N, violation_N, birth_N = state_lib.evaluate_children(
      state, evaluate_fn, children_NxG, feasible_N, valid_N)
  return nsga2.merge_and_select(state, children_NxG, fitness_NxM, feasible_N, violation_N,
                                birth_N)


STEPS = {**driver.STRATEGIES, 'stratified': stratified_step}


def strategy_kwargs(sc: SearchConfig, space) -> dict[str, Any]:
  """The step function's keyword arguments from the config (0 = keep the step's default)."""
  strategy = resolve_strategy(sc)
  kw: dict[str, Any] = {'tries': sc.tries}
  if strategy == 'nsga2':
    kw['crossover_prob'] = sc.crossover_prob
  if strategy in ('nsga2', 'regularized', 'ga') and sc.mutation_prob:
    kw['mutation_prob'] = sc.mutation_prob
  if strategy == 'regularized':
    kw['sample_size'] = sc.sample_size or min(10, sc.pop_size)
  if strategy == 'ga' and sc.top_k:
    kw['top_k'] = sc.top_k
  if strategy == 'stratified':
    lo, hi = space.parameter_range()
    kw.update(stratify_fn=ParamsOf(space), n_bins=sc.stratify_bins,
              value_range=(float(lo), float(hi)))
  accepted = inspect.signature(STEPS[strategy]).parameters
  return {k: v for k, v in kw.items() if k in accepted}


# -- the compiled search loop ----------------------------------------------------------------


class _Spec(NamedTuple):
  """Everything static about a compiled search loop (hashable: the jit cache key)."""

  strategy: str
  fitness: FitnessFn
  feasible_fn: Any
  pop_size: int
  n_children: int
  kwargs: tuple
  length: int  # generations per compiled call


@functools.partial(jax.jit, static_argnames=('spec',))
def _advance(state, base_key, start, n_active, data, *, spec: _Spec):
  """`spec.length` generations from generation `start`; those at i >= n_active are skipped."""
  space = spec.fitness.space

  def step(state, key):
    population_PxG = canonical_genomes(space, state.genomes_PxG)

    def evaluate(children_NxG):
      # Children that are the same architecture as a member or an earlier child under another
      # genome (see `canonical_genomes`) get a NaN fitness, which the strategies treat as
      # infeasible: clones never enter the population, so the front holds distinct networks.
      fitness_NxM = spec.fitness(children_NxG, data)
      clone_N = operators.is_duplicate(canonical_genomes(space, children_NxG), population_PxG,
                                       None, state.occupied_P)
      return jnp.where(clone_N[:, None], jnp.nan, fitness_NxM)

    return STEPS[spec.strategy](state, key, evaluate, feasible_fn=spec.feasible_fn,
                                n_children=spec.n_children, **dict(spec.kwargs))

  def generation(state, i):
    key = jax.random.fold_in(base_key, start + i)
    state = jax.lax.cond(i < n_active, step, lambda s, k: s, state, key)
    return state, {'best': state.best_M, 'n_evals': state.n_evals,
                   'genomes': state.genomes_PxG, 'fitness': state.fitness_PxM,
                   'mask': state.occupied_P & state.feasible_P}

  return jax.lax.scan(generation, state, jnp.arange(spec.length))


class Searcher:
  """A strategy bound to a fitness and constraint, run a few generations per compiled call.

  `advance(state, key, start, count, data)` runs generations [start, start + count) and returns
  the new state and per-generation host arrays: best [n, M], n_evals [n], and the population
  after each generation (genomes [n, P, G], fitness [n, P, M], mask [n, P] = occupied and
  feasible). Every call reuses one compiled program (for a given `generations_per_call`).
  """

  def __init__(self, fitness: Fitness, strategy: str, *, pop_size: int,
               n_children: int | None = None, feasible_fn=None, generations_per_call: int = 5,
               **kwargs):
    if strategy not in STEPS:
      raise UserError(f'unknown strategy {strategy!r}; choose one of {sorted(STEPS)}')
    self.fitness = fitness
    self.gene_sizes = jnp.asarray(fitness.space.gene_sizes, jnp.int32)
    n_children = n_children or driver.default_n_children(strategy, pop_size)
    self.spec = _Spec(strategy, fitness.fn, feasible_fn or None, pop_size, n_children,
                      tuple(sorted(kwargs.items())), generations_per_call)

  @property
  def warmup_generations(self) -> int:
    """Generations that fill the empty population with uniform random genomes."""
    return math.ceil(self.spec.pop_size / self.spec.n_children)

  def init_state(self, seeds_SxG=None, fitness_SxM=None) -> state_lib.SearchState:
    """An empty population, or one holding already evaluated `seeds` (minimised `fitness`) in
    its first slots; the first generations fill the rest with random genomes. Seeds count as
    evaluations."""
    state = state_lib.init_state(self.gene_sizes, self.spec.pop_size, len(self.fitness.names))
    if seeds_SxG is None or len(seeds_SxG) == 0:
      return state
    seeds_SxG = jnp.asarray(seeds_SxG, jnp.int32)[:self.spec.pop_size]
    fitness_SxM = jnp.asarray(fitness_SxM, jnp.float32)[:self.spec.pop_size]
    n = seeds_SxG.shape[0]
    best = jnp.argmin(fitness_SxM, axis=0)
    return state._replace(
        genomes_PxG=state.genomes_PxG.at[:n].set(seeds_SxG),
        fitness_PxM=state.fitness_PxM.at[:n].set(fitness_SxM),
        feasible_P=state.feasible_P.at[:n].set(True),
        birth_P=state.birth_P.at[:n].set(jnp.arange(n, dtype=jnp.int32)),
        best_M=jnp.min(fitness_SxM, axis=0), best_genomes_MxG=seeds_SxG[best],
        n_evals=jnp.int32(n))

  def advance(self, state, key, start: int, count: int, data=None):
    data = self.fitness.data if data is None else data
    outs = []
    done = 0
    while done < count:
      n = min(self.spec.length, count - done)
      state, out = _advance(state, key, jnp.int32(start + done), jnp.int32(n), data,
                            spec=self.spec)
      outs.append(jax.tree.map(lambda x, n=n: np.asarray(x[:n]), out))
      done += n
    history = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return state, history


# -- checkpoint ------------------------------------------------------------------------------

_STATE_FIELDS = state_lib.SearchState._fields
_HISTORY_KEYS = ('best', 'n_evals', 'hv', 'front_size', 'feasible', 'seconds')


@dataclasses.dataclass
class Progress:
  """Everything a resumed search needs besides the (fixed) settings."""

  state: state_lib.SearchState
  generation: int
  key: jax.Array
  ref: np.ndarray  # natural units
  history: dict[str, np.ndarray]
  initial: dict[str, np.ndarray] | None  # the random initial population (the baseline)
  fingerprint: str

  def save(self, path: Path) -> None:
    arrays = {f'state_{k}': np.asarray(v) for k, v in self.state._asdict().items()}
    arrays.update({f'history_{k}': v for k, v in self.history.items()})
    if self.initial is not None:
      arrays.update({f'initial_{k}': v for k, v in self.initial.items()})
    arrays.update(generation=np.int64(self.generation),
                  key_data=np.asarray(jax.random.key_data(self.key)),
                  ref=np.asarray(self.ref, np.float64),
                  fingerprint=np.asarray(self.fingerprint))
    with atomic.open_atomic(path, 'wb') as f:
      np.savez(f, **arrays)

  @classmethod
  def load(cls, path: Path) -> Progress:
    try:
      with np.load(path) as z:
        a = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
      raise UserError(f'{path} is not a readable search checkpoint ({e}); delete it or set '
                      'search.resume=False') from None
    state = state_lib.SearchState(**{k: jnp.asarray(a[f'state_{k}']) for k in _STATE_FIELDS})
    initial = ({k: a[f'initial_{k}'] for k in ('genomes', 'fitness', 'mask')}
               if 'initial_genomes' in a else None)
    return cls(state=state, generation=int(a['generation']),
               key=jax.random.wrap_key_data(jnp.asarray(a['key_data'])),
               ref=a['ref'], history={k: a[f'history_{k}'] for k in _HISTORY_KEYS},
               initial=initial, fingerprint=str(a['fingerprint']))


def fingerprint(cfg, sc: SearchConfig, space, supernet_step) -> str:
  """The settings a checkpoint must share to be resumed (not: generations, chunking, latency)."""
  as_dict = lambda c: c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c or {})
  data_cfg = as_dict(cfg.get('data', {}))
  uses_proxy = any(fitness_lib.get_objective(n).prepare for n in sc.objectives)
  proxy_cfg = as_dict(cfg.get('proxy', {})) if uses_proxy else {}
  return json.dumps({
      'objectives': list(sc.objectives), 'strategy': resolve_strategy(sc),
      'pop_size': sc.pop_size, 'n_children': n_children_of(sc), 'budgets': dict(sc.budgets),
      'ref_point': list(sc.ref_point), 'seed_extremes': sc.seed_extremes, 'strategy_kwargs': {
          k: v for k, v in strategy_kwargs(sc, space).items() if isinstance(v, int | float)},
      'seed': sc.seed, 'supernet_step': supernet_step, 'proxy': proxy_cfg,
      'model': dataclasses.asdict(space.model), 'space': dataclasses.asdict(space.cfg),
      'data': {k: v for k, v in dict(data_cfg).items()
               if k not in ('cache_dir', 'num_workers', 'shuffle')},
  }, sort_keys=True, default=str)


def _fingerprint_diff(old: str, new: str) -> list[str]:
  a, b = json.loads(old), json.loads(new)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# -- the job ---------------------------------------------------------------------------------


def _log_stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def training_free(sc: SearchConfig) -> bool:
  """Whether every objective is a zero-cost proxy or an analytic cost (nothing reads the trained
  supernet's validation loss or accuracy)."""
  from elastic_jax.proxies import PROXIES  # noqa: PLC0415
  return all(name in PROXIES or not fitness_lib.get_objective(name).needs_model
             for name in sc.objectives)


def load_trained_supernet(cfg, workdir, space, allow_untrained: bool = False):
  """(model, step) of the latest trained supernet in W/checkpoints, or a UserError saying to
  train first (or the initialisation with step None when `allow_untrained`). A workdir whose
  `train.init_from` names pre-trained weights (an imported Hugging Face model) is searchable
  before any training: step None, the pre-trained weights."""
  from elastic_jax import checkpoints  # noqa: PLC0415
  from elastic_jax.workdir import load_supernet  # noqa: PLC0415

  ckpt = Path(workdir) / checkpoints.DIRNAME
  has_checkpoint = checkpoints.has_checkpoints(workdir)
  step = None
  model = None
  if has_checkpoint:
    model, step = load_supernet(cfg, str(workdir), space)
  pretrained = bool(cfg.get('train', {}).get('init_from', ''))
  if step is None:
    if not (allow_untrained or pretrained):
      raise UserError(
          f'no trained supernet in {ckpt}: run `elastic-jax train --config=<config> '
          f'--workdir={workdir}` first (or `elastic-jax run`, which trains, searches and '
          'exports); search.allow_untrained=True searches the untrained initialisation')
    model = model or load_supernet(cfg, None, space)[0]
  return model, step


def _hypervolumes(fitness_NxPxM, mask_NxP, ref_min_M) -> np.ndarray:
  return np.asarray([hypervolume_nd(f, ref_min_M, m) for f, m in zip(fitness_NxPxM, mask_NxP)])


def _front_sizes(fitness_NxPxM, mask_NxP) -> np.ndarray:
  return np.asarray([int(np.sum(np.asarray(pareto_front_mask(f, m))))
                     for f, m in zip(fitness_NxPxM, mask_NxP)])


def _extreme_genomes(space) -> np.ndarray:
  return np.stack([extreme_genome(space, 'params', largest=False),
                   extreme_genome(space, 'params', largest=True)])


def _extreme_seeds(sc: SearchConfig, space, fitness: Fitness, budgets: Budgets,
                   extremes: dict[str, np.ndarray]):
  """(genomes, minimised fitness) of the smallest / largest architectures within the budgets,
  or (None, None) when search.seed_extremes is off."""
  if not sc.seed_extremes:
    return None, None
  genomes = _extreme_genomes(space)
  ok = np.asarray(budgets(jnp.asarray(genomes))) if budgets else np.ones(2, bool)
  natural = np.stack([extremes[n] for n in fitness.names], axis=1)
  return genomes[ok], fitness.to_minimised(natural)[ok]


def _register_proxies(sc: SearchConfig, proxy_cfg) -> None:
  """Zero-cost proxies named in search.objectives, with the experiment's `proxy` section."""
  from elastic_jax.proxies import PROXIES  # noqa: PLC0415
  from elastic_jax.search.fitness import proxy_objective, register_objective  # noqa: PLC0415
  for name in sc.objectives:
    if name in PROXIES and name != 'params':
      register_objective(proxy_objective(name, proxy_cfg), overwrite=True)


def run_search(cfg, workdir: str | Path, *, model=None, supernet_step: int | None = None,
               log: Callable[[str], None] = _log_stderr) -> dict:
  """Runs (or resumes, or just re-reports) the configured search; writes W/search/.

  `model`: search this supernet instead of loading W's latest trained one (tests, benches).
  Returns {'pareto': the pareto.json dict, 'table': the front as text, 'plot', 'summary',
  'pareto_json', 'history' paths, 'hypervolume', 'generations', 'n_evals', 'seconds',
  'fitness_traces' (traces of the fitness in this call: 1 for a fresh search, 0 when an equal
  search already compiled the loop in this process)}.
  """
  from elastic_jax import workdir as workdir_lib  # noqa: PLC0415

  sc = search_config(cfg)
  workdir_lib.build_space(cfg)  # a bad config fails before the workdir is touched
  from elastic_jax import data as data_lib  # noqa: PLC0415
  data_lib.check_lm_task(cfg.data)
  is_main = jax.process_index() == 0
  with workdir_lib.cleanup_on_failure(workdir) if is_main else contextlib.nullcontext():
    if is_main and not (Path(workdir) / workdir_lib.CONFIG_FILE).is_file():
      workdir_lib.save_config(workdir, cfg)  # later commands find the config in W
    return _run_search(cfg, workdir, sc, model, supernet_step, log)


def _run_search(cfg, workdir, sc: SearchConfig, model, supernet_step, log) -> dict:
  from elastic_jax import data as data_lib  # noqa: PLC0415
  from elastic_jax.search import report  # noqa: PLC0415
  from elastic_jax.workdir import build_space  # noqa: PLC0415

  space = build_space(cfg)
  _register_proxies(sc, cfg.get('proxy', None))
  strategy = resolve_strategy(sc)
  budgets = Budgets(space, dict(sc.budgets))
  share = budgets.check(seed=sc.seed)  # UserError naming the smallest achievable value
  if share < 0.02:
    log(f'warning: only {share:.1%} of random architectures meet search.budgets; the search '
        'may propose few feasible children (raise search.tries or the budgets)')
  if model is None and training_free(sc):
    from elastic_jax.workdir import init_supernet  # noqa: PLC0415
    log('search: every objective is zero-cost; scoring the seeded initialisation (no training '
        'needed)')
    model, supernet_step = init_supernet(cfg, space), None
  elif model is None:
    model, supernet_step = load_trained_supernet(cfg, workdir, space, sc.allow_untrained)
  batches = data_lib.eval_batches(cfg.data, _scone_transform(cfg, workdir))
  fitness = Fitness(space, sc.objectives, model=model, batches=batches, chunk=sc.chunk)
  searcher = Searcher(fitness, strategy, pop_size=sc.pop_size, n_children=n_children_of(sc),
                      feasible_fn=budgets, generations_per_call=sc.checkpoint_every,
                      **strategy_kwargs(sc, space))
  out_dir = Path(workdir) / SEARCH_DIR
  ckpt_path = out_dir / CHECKPOINT_FILE
  fp = fingerprint(cfg, sc, space, supernet_step)
  # The smallest and largest architectures: baselines of the report, and the reference point of
  # objectives without an analytic one (the loss).
  report_names = tuple(dict.fromkeys(REPORT_METRICS + fitness.names))
  extremes = fitness.extremes(report_names)
  ref_nat = fitness.reference_point(sc.ref_point, extremes)
  if not np.all(np.isfinite(ref_nat)):
    raise UserError(f'no hypervolume reference point for objectives {list(fitness.names)}: '
                    f'set search.ref_point (got {ref_nat.tolist()})')

  progress = None
  if sc.resume and ckpt_path.is_file():
    progress = Progress.load(ckpt_path)
    if progress.fingerprint != fp:
      changed = _fingerprint_diff(progress.fingerprint, fp)
      if changed != ['supernet_step']:
        raise UserError(
            f'{ckpt_path} comes from a different search (changed: {", ".join(changed)}); set '
            'search.resume=False to start over (it is overwritten), or use another workdir')
      # Same search, newer weights: the old fitness values are stale, so start over.
      log(f'search: the supernet was trained further (now step {supernet_step}) since '
          f'{ckpt_path} was written; starting the search over')
      progress = None
    else:
      log(f'search: resuming {ckpt_path} at generation {progress.generation}/{sc.generations}')
  if progress is None:
    progress = Progress(
        state=searcher.init_state(*_extreme_seeds(sc, space, fitness, budgets, extremes)),
        generation=0, key=jax.random.key(sc.seed),
        ref=ref_nat,
        history={'best': np.zeros((0, len(sc.objectives))), 'n_evals': np.zeros(0, np.int64),
                 'hv': np.zeros(0), 'front_size': np.zeros(0, np.int64),
                 'feasible': np.zeros(0, np.int64), 'seconds': np.zeros(0)},
        initial=None, fingerprint=fp)
    log(f'search: {strategy} on {list(sc.objectives)}, population {sc.pop_size}, '
        f'{searcher.spec.n_children} evaluations per generation, {sc.generations} generations, '
        f'supernet step {supernet_step}')

  history_path = out_dir / 'history.jsonl'
  digest = results_digest(fp, sc, progress.generation)
  done = (report.load_finished(out_dir, digest) if progress.generation >= sc.generations
          else None)
  if done is not None:
    # The same search, already finished and reported: report it again as it is (measuring the
    # latency again would rewrite pareto.json with other numbers).
    log(f'search: {out_dir / report.PARETO_FILE} already holds this search '
        f'({progress.generation} generations); reporting it unchanged')
    paths = report.write_all(out_dir, done, progress.history, fitness.names, only_missing=True)
    return _result(done, paths, progress, fitness)
  warm = searcher.warmup_generations
  while progress.generation < sc.generations:
    g0 = progress.generation
    n = min(sc.checkpoint_every, sc.generations - g0)
    start = time.perf_counter()
    state, h = searcher.advance(progress.state, progress.key, g0, n)
    seconds = time.perf_counter() - start
    ref_min = fitness.to_minimised(progress.ref)
    snap = min(warm, sc.generations) - 1
    if progress.initial is None and g0 <= snap < g0 + n:
      i = snap - g0
      progress.initial = {'genomes': h['genomes'][i], 'fitness': h['fitness'][i],
                          'mask': h['mask'][i]}
    best = fitness.to_natural(h['best'])
    prev_seconds = progress.history['seconds'][-1] if len(progress.history['seconds']) else 0.0
    new = {'best': best, 'n_evals': h['n_evals'].astype(np.int64),
           'hv': _hypervolumes(h['fitness'], h['mask'], ref_min),
           'front_size': _front_sizes(h['fitness'], h['mask']),
           'feasible': h['mask'].sum(axis=1).astype(np.int64),
           'seconds': prev_seconds + seconds * (np.arange(1, n + 1) / n)}
    progress.history = {k: np.concatenate([progress.history[k], new[k]]) for k in new}
    progress.state = state
    progress.generation = g0 + n
    progress.save(ckpt_path)
    report.write_history(history_path, progress.history, fitness.names)
    evals = int(new['n_evals'][-1])
    log(f'search: generation {progress.generation}/{sc.generations}, {evals} evaluations, '
        + ', '.join(f'best {k} {v:.4g}' for k, v in zip(fitness.names, best[-1]))
        + (f', hypervolume {new["hv"][-1]:.4g}' if len(fitness.names) > 1 else '')
        + f', {n * searcher.spec.n_children / seconds:.1f} archs/s')

  pareto = build_pareto(sc, space, fitness, model, batches, progress, supernet_step, strategy,
                        extremes, log)
  pareto['results_digest'] = results_digest(fp, sc, progress.generation)
  paths = report.write_all(out_dir, pareto, progress.history, fitness.names)
  return _result(pareto, paths, progress, fitness)


def _result(pareto, paths, progress, fitness) -> dict:
  from elastic_jax.search import report  # noqa: PLC0415
  return {'pareto': pareto, 'table': report.format_table(pareto), **paths,
          'hypervolume': pareto['hypervolume'], 'generations': progress.generation,
          'n_evals': pareto['n_evals'], 'seconds': pareto['search_seconds'],
          'fitness_traces': fitness.traces}


def results_digest(fp: str, sc: SearchConfig, generations: int) -> str:
  """Identifies a finished search's results: its settings, its length, the latency settings."""
  import hashlib  # noqa: PLC0415
  text = json.dumps([fp, generations, sc.latency, sc.latency_max, sc.latency_repeats])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _front_order(fitness: Fitness, state, mask_P) -> np.ndarray:
  """Indices of the final front, sorted by the second objective (for one objective the front is
  taken on (objective, params))."""
  fit_PxM = np.asarray(state.fitness_PxM, np.float64)
  if fit_PxM.shape[1] == 1:
    params = np.asarray(fitness.evaluate(np.asarray(state.genomes_PxG), ('params',))['params'])
    fit_PxM = np.concatenate([fit_PxM, params[:, None]], axis=1)
  on_front = np.asarray(pareto_front_mask(fit_PxM, mask_P))
  index = np.flatnonzero(on_front)
  return index[np.lexsort((fit_PxM[index, 0], fit_PxM[index, 1]))]


def measure_latency(model, space, genomes, batch: Mapping, repeats: int = 5) -> list[float]:
  """Milliseconds per forward of `batch` for each genome's exported dense model (median of
  `repeats` runs after one compile-and-warm-up call)."""
  from flax import nnx  # noqa: PLC0415

  from elastic_jax import evaluation  # noqa: PLC0415
  from elastic_jax import export as export_lib  # noqa: PLC0415

  inputs = {k: jnp.asarray(v) for k, v in evaluation.model_inputs(batch).items()}
  out = []
  for genome in genomes:
    dense = export_lib.export(model, space.cfg, space.decode(jnp.asarray(genome)))
    graphdef, state = nnx.split(dense)
    forward = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
    jax.block_until_ready(forward(state, inputs))
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(forward(state, inputs))
      times.append(time.perf_counter() - t)
    out.append(1e3 * float(np.median(times)))
  return out


def build_pareto(sc: SearchConfig, space, fitness: Fitness, model, batches, progress,
                 supernet_step, strategy: str, extremes: dict[str, np.ndarray],
                 log=_log_stderr) -> dict:
  """The pareto.json content: the front, the baselines (`extremes`: every report metric at the
  smallest and largest architectures), the settings."""
  from elastic_jax import arch as arch_lib  # noqa: PLC0415

  state = jax.tree.map(np.asarray, progress.state)
  mask_P = state.occupied_P & state.feasible_P
  if not mask_P.any():
    raise UserError('the search found no architecture that meets search.budgets '
                    f'{dict(sc.budgets)}; raise the budgets or search.tries')
  front = _front_order(fitness, state, mask_P)
  # Reported genomes are canonical: genes that do not change the network are zeroed.
  front_genomes = np.asarray(canonical_genomes(space, state.genomes_PxG[front]))
  smallest, largest = _extreme_genomes(space)
  initial = progress.initial
  random_genomes = np.zeros((0, space.num_genes), np.int32)
  if initial is not None and initial['mask'].any():
    random_genomes = np.asarray(canonical_genomes(space, initial['genomes'][initial['mask']]))
    seeded = np.asarray(canonical_genomes(space, np.stack([smallest, largest])))
    is_seed = (random_genomes[:, None, :] == seeded[None]).all(-1).any(-1)
    random_genomes = random_genomes[~is_seed]  # the random ones only
  names = tuple(extremes)
  everything = np.concatenate([front_genomes, smallest[None], largest[None], random_genomes])
  values = fitness.evaluate(np.concatenate([front_genomes, random_genomes]), names)
  values = {n: np.concatenate([values[n][:len(front)], extremes[n], values[n][len(front):]])
            for n in names}
  rows = [{k: float(v[i]) for k, v in values.items()} for i in range(len(everything))]
  nf = len(front)
  latency = [None] * (nf + 2)
  if sc.latency and sc.latency_max > 0:
    pick = np.unique(np.round(np.linspace(0, nf - 1, min(nf, sc.latency_max))).astype(int))
    chosen = list(pick) + [nf, nf + 1]
    log(f'search: measuring latency of {len(chosen)} exported models on '
        f'{jax.devices()[0].device_kind}')
    ms = measure_latency(model, space, everything[chosen], batches[0], sc.latency_repeats)
    for i, v in zip(chosen, ms):
      latency[i] = round(v, 4)

  def entry(i, genome):
    return {'genome': [int(x) for x in genome],
            'arch': arch_lib.to_json(space.decode(jnp.asarray(genome))),
            'objectives': {n: rows[i][n] for n in fitness.names},
            'metrics': rows[i], 'latency_ms': latency[i] if i < len(latency) else None}

  ref_min = fitness.to_minimised(progress.ref)
  final_fit = np.asarray([[rows[i][n] for n in fitness.names] for i in range(nf)])
  hv_final = hypervolume_nd(fitness.to_minimised(final_fit), ref_min) if nf else 0.0
  random_fit = np.asarray([[rows[i][n] for n in fitness.names]
                           for i in range(nf + 2, len(everything))]).reshape(-1, len(fitness.names))
  hv_random = (hypervolume_nd(fitness.to_minimised(random_fit), ref_min)
               if len(random_fit) else 0.0)
  batch0 = batches[0]['tokens'].shape
  history = progress.history
  seconds = float(history['seconds'][-1]) if len(history['seconds']) else 0.0
  n_evals = int(history['n_evals'][-1]) if len(history['n_evals']) else 0
  return {
      'objectives': list(fitness.names),
      'maximize': list(fitness.maximize),
      'descriptions': {n: o.description for n, o in zip(fitness.names, fitness.objectives)},
      'strategy': strategy, 'pop_size': sc.pop_size, 'n_children': n_children_of(sc),
      'generations': progress.generation, 'n_evals': n_evals, 'search_seconds': seconds,
      'archs_per_second': n_evals / seconds if seconds else None,
      'budgets': dict(sc.budgets), 'seed': sc.seed, 'supernet_step': supernet_step,
      'ref_point': [float(v) for v in progress.ref], 'hypervolume': float(hv_final),
      'hypervolume_random_initial': float(hv_random),
      'latency_batch': list(batch0), 'device': jax.devices()[0].device_kind,
      'eval_tokens': int(sum(float(np.sum(b['weights'])) for b in batches)),
      'front': [dict(index=k, **entry(k, g)) for k, g in enumerate(front_genomes)],
      'baselines': {'smallest': entry(nf, smallest), 'largest': entry(nf + 1, largest)},
      'random': [{'genome': [int(x) for x in g], 'metrics': rows[nf + 2 + j]}
                 for j, g in enumerate(random_genomes)],
  }


def _scone_transform(cfg, workdir):
  """A SCONE run's f-gram lookup for the validation batches (None without SCONE): sub-networks
  are scored with their f-gram embeddings, computed by the f-gram model on the device (the
  training-mode forward, which the precomputed table reproduces exactly)."""
  from elastic_jax.scone import job as scone_job  # noqa: PLC0415
  from elastic_jax.scone.config import scone_config  # noqa: PLC0415

  scfg = scone_config(cfg.get('scone'))
  if scfg is None:
    return None
  return scone_job.batch_transform(scone_job.run_fgrams(scfg, cfg.data, workdir, write=False))
