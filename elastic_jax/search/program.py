"""The search's compiled program on the trainer's mesh, built one way for `search` and for
`elastic-jax compile` (elastic_jax/aot.py): the fitness (a population forward through the
supernet, cut by `placement.eval_plan`, its data laid out by `placement`) and the compiled loop
(`driver.advance`) that calls it.

  program = build(sc, space, mesh, names, model=model, batches=batches)   # the search
  program = build(sc, space, mesh, names, graphdef=g, data=shapes)        # compile: shapes only
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from elastic_jax import parallel
from elastic_jax.search import driver, placement
from elastic_jax.search.budgets import Budgets
from elastic_jax.search.config import (
  SearchConfig,
  n_children_of,
  resolve_strategy,
  strategy_kwargs,
)
from elastic_jax.search.fitness import Fitness
from elastic_jax.search.genomes import CanonicalKey


@dataclasses.dataclass
class Program:
  """A search's fitness on `mesh` (its `data` placed there, or abstract), how it is cut
  (`plan`), and the loop that runs it (`searcher`; None when only the fitness was asked)."""

  fitness: Fitness
  plan: placement.EvalPlan | None
  mesh: jax.sharding.Mesh
  searcher: driver.Searcher | None = None


def make_searcher(fitness: Fitness, strategy: str, **kwargs) -> driver.Searcher:
  """The compiled loop for `fitness` (its objectives, evaluated on `fitness.data`); children
  are deduplicated by network (`genomes.canonical_genomes`), not by raw genome. `kwargs`: those
  of `driver.Searcher` (pop_size, n_children, feasible_fn, generations_per_call, archive_size)
  and the strategy's."""
  return driver.Searcher(fitness.fn, fitness.space.gene_sizes, len(fitness.names), strategy,
                         key_fn=CanonicalKey(fitness.space), data=fitness.data, **kwargs)


def fitness_on_mesh(sc: SearchConfig, space, mesh, names: Sequence[str], *, model=None,
                    batches: Sequence[Mapping] | None = None, graphdef=None,
                    data: Mapping | None = None) -> Program:
  """The fitness of objectives `names` on `mesh`: from a model and validation batches (placed
  on the mesh), or from a graphdef and shapes-only data (made abstract with their shardings)."""
  from elastic_jax.search.objectives import get_objective  # noqa: PLC0415
  if not any(get_objective(n).needs_model for n in names):  # analytic only: no data, no mesh
    return Program(Fitness(space, names), None, mesh)
  if model is not None and not isinstance(batches, Mapping):
    shapes = {k: np.shape(v) for k, v in batches[0].items()}
  else:  # stacked batches [n, rows, ...] (arrays, or shapes only)
    shapes = {k: tuple(v.shape[1:]) for k, v in (batches if model is not None
                                                  else data['batches']).items()}
  rows, seq_len = shapes['tokens']
  # Logits are formed at every position, or at a masked-LM batch's named ones.
  positions = shapes['mlm_positions'][1] if 'mlm_positions' in shapes else seq_len
  plan = placement.eval_plan(sc.chunk, sc.max_logits_mib, int(rows), int(positions),
                             space.model.vocab_size, mesh)
  if model is not None:
    fitness = Fitness(space, names, model=model, batches=batches, chunk=plan.chunk,
                      micro_batches=plan.micro_batches, mesh=mesh,
                      hidden_buckets=sc.hidden_buckets)
  else:
    fitness = Fitness(space, names, chunk=plan.chunk, micro_batches=plan.micro_batches,
                      graphdef=graphdef, data=placement.abstract_data(data, mesh),
                      hidden_buckets=sc.hidden_buckets, mesh=mesh)
  return Program(fitness, plan, mesh)


def build(sc: SearchConfig, space, mesh, *, model=None, batches=None, graphdef=None,
          data=None) -> Program:
  """The search's fitness of `sc.objectives` on `mesh` and its compiled loop."""
  program = fitness_on_mesh(sc, space, mesh, sc.objectives, model=model, batches=batches,
                            graphdef=graphdef, data=data)
  program.searcher = make_searcher(
      program.fitness, resolve_strategy(sc), pop_size=sc.pop_size, n_children=n_children_of(sc),
      feasible_fn=Budgets(space, dict(sc.budgets)), generations_per_call=sc.checkpoint_every,
      archive_size=sc.archive_size, **strategy_kwargs(sc, space))
  return program


def lowered_advance(program: Program):
  """`driver.advance` of `program` (data abstract or placed) lowered with abstract arguments: a
  fresh search state, its key and generation counters replicated on the mesh. What the search
  runs per `search.checkpoint_every` generations, and what `elastic-jax compile` compiles."""
  searcher = program.searcher
  rep = parallel.replicated(program.mesh)
  sds = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=rep)
  state = jax.tree.map(sds, searcher.init_state())
  key = sds(jax.random.key(0))
  counter = jax.ShapeDtypeStruct((), np.int32, sharding=rep)
  return driver.advance.lower(state, key, counter, counter, program.fitness.data,
                              spec=searcher.spec)


def stacked_shapes(graphdef_state, batch: Mapping, n_batches: int) -> dict:
  """Shapes-only fitness data: the supernet's (abstract) state and n stacked validation batches
  shaped as `batch` (name -> an array or shape-and-dtype of one batch)."""
  return {'state': graphdef_state,
          'batches': {k: jax.ShapeDtypeStruct((n_batches, *v.shape), v.dtype)
                      for k, v in batch.items()}}

