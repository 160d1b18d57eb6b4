"""The `search` section of an experiment config: its defaults (every field commented), the
validated `SearchConfig`, and how it resolves to a strategy and the strategy's arguments."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import ml_collections

from elastic_jax.errors import UserError
from elastic_jax.search import driver
from elastic_jax.search.budgets import check_bound
from elastic_jax.search.genomes import ParamsOf
from elastic_jax.search.objectives import check_not_empty

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
  #   more via elastic_jax.search.objectives.register_objective.
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
  # 0 = as many as `max_logits_mib` allows. Whatever is asked, the archs run together are capped
  # so that their float32 logits fit in `max_logits_mib` (see search/placement.py).
  c.chunk = 1
  # With chunk 1, each arch's forward runs on the supernet narrowed to its own hidden size (one
  # compiled branch per hidden choice, `lax.switch`): the same losses, matmuls and logits as
  # narrow as the arch (about 2x faster on the bench_peers space), at a longer compile.
  c.hidden_buckets = True
  # Upper bound, in MiB per device, on the float32 logits [archs, rows, seq_len, vocab] of one
  # step of the population forward. Fewer archs run together when they would exceed it, and a
  # validation batch whose logits alone exceed it runs as strided micro-batches of fewer rows
  # (same losses). Below one sequence's logits (seq_len x vocab x 4 bytes) is an error.
  c.max_logits_mib = 1024.0
  # Evaluated genomes remembered across generations (in the compiled state and the checkpoint):
  # a child that is the same network as one of them is resampled, so no architecture is scored
  # twice. A ring buffer: past this many evaluations the oldest are forgotten (and may be scored
  # again). Must be >= n_children; 0 = only the current population is checked. Changing it
  # changes the search (the checkpoint is then refused).
  c.archive_size = 4096
  # The final front is re-scored on this many held-out validation batches: the ones after the
  # `data.eval_batches` batches the search selects on (with data.eval_batches = 0, the last ones
  # of the split, which selection then does not use; fewer, with a warning, when the split runs
  # out). The report gives both values. 0 = off; -1 (default) = as many as the search selects
  # on (data.eval_batches; 2 when that is 0): the re-scoring then runs the program that scored
  # the front, with no compile of its own.
  c.holdout_batches = -1
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
  c.tries = 4  # candidates per child in each of 3 proposal rounds, to find feasible, new ones
  c.stratify_bins = 8  # stratified: parameter-count bins
  # Start the population with the smallest and largest architectures (those within the budgets):
  # the two ends of the front, which random proposals rarely hit. They count as evaluations.
  c.seed_extremes = True
  # Also start it with these architectures: a file of JSON archs (JSON lines as `elastic-jax
  # sample` prints them, or a JSON list), e.g. known-good shapes such as `compress`'s pruned
  # models; those within the budgets count as evaluations. '' = none.
  c.seed_archs = ''
  # Seed of the search; -1 = the config's top-level seed.
  c.seed = -1
  # Measure the latency of each exported dense front member on this device (jit once per model,
  # median of `latency_repeats` forwards of one validation batch), at most `latency_max` of them
  # (evenly spaced along the front).
  c.latency = True
  c.latency_max = 24
  c.latency_repeats = 5
  # Decoders, with `latency`: also the decode latency (elastic_jax.generate's KV-cache decoding,
  # batch 1: prefill ms of a 32-token prompt and ms per new token over 16) of at most this many
  # front members (evenly spaced) and the two baselines; 0 = off. Two compiles per model.
  c.decode_latency_max = 2
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
  hidden_buckets: bool
  max_logits_mib: float
  checkpoint_every: int
  resume: bool
  ref_point: tuple[float, ...]
  mutation_prob: float
  crossover_prob: float
  sample_size: int
  top_k: int
  tries: int
  seed_extremes: bool
  seed_archs: str
  stratify_bins: int
  archive_size: int
  holdout_batches: int
  seed: int
  latency: bool
  latency_max: int
  latency_repeats: int
  decode_latency_max: int
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
  budgets = {k: check_bound(k, v) for k, v in budgets.items()}  # UserError: negative, not a number
  merged.update(given)
  seed = int(merged['seed'])
  if seed < 0:
    seed = int(cfg.get('seed', 0)) if hasattr(cfg, 'get') else 0
  holdout = int(merged['holdout_batches'])
  if holdout < -1:
    raise UserError(f'search.holdout_batches must be >= 0, or -1 for as many as '
                    f'data.eval_batches; got {holdout}')
  if holdout == -1:  # as many as the search selects on
    data = cfg.get('data', None) if hasattr(cfg, 'get') else None
    holdout = int((data.get('eval_batches', 0) if hasattr(data, 'get') else 0) or 2)
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
  check_not_empty(objectives)
  paper = bool(fitness)  # the W-PCA paper's population and generations
  sc = SearchConfig(
      objectives=tuple(objectives), fitness=fitness, strategy=str(merged['strategy']),
      generations=int(merged['generations']) or (40 if paper else 30),
      pop_size=int(merged['pop_size']) or (50 if paper else 32),
      n_children=int(merged['n_children']),
      budgets=tuple(sorted((k, float(v)) for k, v in budgets.items() if v)),
      chunk=int(merged['chunk']), hidden_buckets=bool(merged['hidden_buckets']),
      max_logits_mib=float(merged['max_logits_mib']),
      checkpoint_every=int(merged['checkpoint_every']),
      resume=bool(merged['resume']), ref_point=tuple(float(v) for v in merged['ref_point']),
      mutation_prob=float(merged['mutation_prob']),
      crossover_prob=float(merged['crossover_prob']), sample_size=int(merged['sample_size']),
      top_k=int(merged['top_k']), tries=int(merged['tries']),
      seed_extremes=bool(merged['seed_extremes']), seed_archs=str(merged['seed_archs'] or ''),
      stratify_bins=int(merged['stratify_bins']), archive_size=int(merged['archive_size']),
      holdout_batches=holdout, seed=seed, latency=bool(merged['latency']),
      latency_max=int(merged['latency_max']), latency_repeats=int(merged['latency_repeats']),
      decode_latency_max=int(merged['decode_latency_max']),
      allow_untrained=bool(merged['allow_untrained']), export_pick=str(merged['export_pick']))
  if sc.strategy not in STRATEGY_NAMES:
    raise UserError(f'search.strategy is {sc.strategy!r}; use one of {", ".join(STRATEGY_NAMES)}')
  for name, low in (('generations', 1), ('pop_size', 2), ('n_children', 0), ('chunk', 0),
                    ('checkpoint_every', 1), ('tries', 1), ('stratify_bins', 1),
                    ('latency_max', 0), ('latency_repeats', 1), ('decode_latency_max', 0),
                    ('sample_size', 0),
                    ('top_k', 0), ('archive_size', 0)):
    if getattr(sc, name) < low:
      raise UserError(f'search.{name} must be >= {low}, got {getattr(sc, name)}')
  if sc.n_children > sc.pop_size and resolve_strategy(sc) in ('regularized', 'ga'):
    raise UserError(f'search.n_children={sc.n_children} must be <= search.pop_size='
                    f'{sc.pop_size} for strategy {resolve_strategy(sc)!r}')
  if not sc.max_logits_mib > 0:
    raise UserError(f'search.max_logits_mib must be > 0 (MiB of float32 logits per device), '
                    f'got {sc.max_logits_mib:g}')
  if not 0.0 <= sc.mutation_prob <= 1.0 or not 0.0 <= sc.crossover_prob <= 1.0:
    raise UserError('search.mutation_prob and search.crossover_prob must be in [0, 1]')
  if 0 < sc.archive_size < n_children_of(sc):
    raise UserError(f'search.archive_size={sc.archive_size} must be 0 or at least the '
                    f'architectures evaluated per generation ({n_children_of(sc)})')
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
  accepted = inspect.signature(driver.STRATEGIES[strategy]).parameters
  return {k: v for k, v in kw.items() if k in accepted}
