"""The final Pareto front of a search, as the plain dict that pareto.json stores: the front's
genomes, archs, every objective and cost on the selection batches and on held-out batches, the
measured latency of the exported dense models, the baselines (smallest, largest, random
initial population), the settings. `search/report.py` renders it."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from elastic_jax import distributed, latency
from elastic_jax.errors import UserError
from elastic_jax.search.config import SearchConfig, n_children_of
from elastic_jax.search.fitness import Fitness
from elastic_jax.search.genomes import (
  arch_at,
  canonical_genomes_host,
  decode_genomes,
  extreme_genomes,
)
from elastic_jax.search.hypervolume import hypervolume_nd, pareto_front_mask
from elastic_jax.search.objectives import get_objective


def _quiet(msg: str) -> None:
  del msg


def hypervolumes(fitness_NxPxM, mask_NxP, ref_min_M) -> np.ndarray:
  return np.asarray([hypervolume_nd(f, ref_min_M, m) for f, m in zip(fitness_NxPxM, mask_NxP)])


def front_sizes(fitness_NxPxM, mask_NxP) -> np.ndarray:
  return np.asarray([int(np.sum(np.asarray(pareto_front_mask(f, m))))
                     for f, m in zip(fitness_NxPxM, mask_NxP)])


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
  from elastic_jax import export as export_lib  # noqa: PLC0415
  archs = decode_genomes(space, genomes)
  return [latency.forward_ms(export_lib.export(model, space.cfg, arch_at(archs, i)), batch, repeats)
          for i in range(len(genomes))]


def measure_decode_latency(model, space, genomes, repeats: int = 3) -> list[dict]:
  """Prefill and per-token decode milliseconds (`generate.decode_latency`) of each genome's
  exported dense decoder."""
  from elastic_jax import export as export_lib  # noqa: PLC0415
  from elastic_jax.generate import decode_latency  # noqa: PLC0415
  archs = decode_genomes(space, genomes)
  return [decode_latency(export_lib.export(model, space.cfg, arch_at(archs, i)), repeats=repeats)
          for i in range(len(genomes))]


def _spread(n: int, k: int) -> list[int]:
  """At most k indices evenly spaced over range(n)."""
  if n == 0 or k == 0:
    return []
  return [int(i) for i in np.unique(np.round(np.linspace(0, n - 1, min(n, k))).astype(int))]


def build_pareto(sc: SearchConfig, space, fitness: Fitness, model, batches, progress,
                 supernet_step, strategy: str, extremes: dict[str, np.ndarray],
                 log=_quiet, heldout: Mapping | None = None) -> dict:
  """The pareto.json content: the front, the baselines (`extremes`: every report metric at the
  smallest and largest architectures), the settings. `heldout`: `fitness.data` of validation
  batches the search never scored with; every front member and baseline then also carries its
  data-dependent metrics on them (`heldout`), beside the values that selected it (`metrics`).
  They are scored by the program that scored the front (one compile for both where the batch
  counts agree)."""
  from elastic_jax import arch as arch_lib  # noqa: PLC0415

  state = jax.tree.map(np.asarray, progress.state)
  mask_P = state.occupied_P & state.feasible_P
  if not mask_P.any():
    raise UserError('the search found no architecture that meets search.budgets '
                    f'{dict(sc.budgets)}; raise the budgets or search.tries')
  front = _front_order(fitness, state, mask_P)
  # Reported genomes are canonical: genes that do not change the network are zeroed.
  front_genomes = canonical_genomes_host(space, state.genomes_PxG[front])
  smallest, largest = extreme_genomes(space)
  initial = progress.initial
  random_genomes = np.zeros((0, space.num_genes), np.int32)
  if initial is not None and initial['mask'].any():
    random_genomes = canonical_genomes_host(space, initial['genomes'][initial['mask']])
    seeded = canonical_genomes_host(space, np.stack([smallest, largest]))
    is_seed = (random_genomes[:, None, :] == seeded[None]).all(-1).any(-1)
    random_genomes = random_genomes[~is_seed]  # the random ones only
  names = tuple(extremes)
  everything = np.concatenate([front_genomes, smallest[None], largest[None], random_genomes])
  values = fitness.evaluate(np.concatenate([front_genomes, random_genomes]), names)
  values = {n: np.concatenate([values[n][:len(front)], extremes[n], values[n][len(front):]])
            for n in names}
  rows = [{k: float(v[i]) for k, v in values.items()} for i in range(len(everything))]
  nf = len(front)
  ref_min = fitness.to_minimised(progress.ref)
  held, hv_heldout, heldout_info = [None] * (nf + 2), None, {}
  if heldout is not None:
    log(f'search: re-scoring the front on {heldout["batches"]["tokens"].shape[0]} held-out '
        'validation batches')
    scores = fitness.evaluate(everything[:nf + 2], names, data=heldout)
    data_dependent = [n for n in names if get_objective(n).needs_model]
    held = [{n: float(scores[n][i]) for n in data_dependent} for i in range(nf + 2)]
    heldout_fit = np.asarray([[held[i].get(n, rows[i][n]) for n in fitness.names]
                              for i in range(nf)]).reshape(-1, len(fitness.names))
    hv_heldout = float(hypervolume_nd(fitness.to_minimised(heldout_fit), ref_min)) if nf else 0.0
    weights = distributed.to_host(heldout['batches']['weights'])
    heldout_info = {'heldout_batches': int(weights.shape[0]),
                    'heldout_tokens': int(weights.sum())}

  # Every process scores (collectives on a multi-process mesh) before process 0 alone times.
  latency, decode = [None] * (nf + 2), [None] * (nf + 2)
  if sc.latency and sc.latency_max > 0:
    chosen = _spread(nf, sc.latency_max) + [nf, nf + 1]
    log(f'search: measuring latency of {len(chosen)} exported models on '
        f'{jax.devices()[0].device_kind}')
    ms = measure_latency(model, space, everything[chosen], batches[0], sc.latency_repeats)
    for i, v in zip(chosen, ms):
      latency[i] = round(v, 4)
  if sc.latency and sc.decode_latency_max > 0 and model.cfg.kind == 'decoder':
    chosen = _spread(nf, sc.decode_latency_max) + [nf, nf + 1]
    log(f'search: measuring decode latency of {len(chosen)} exported models')
    for i, v in zip(chosen, measure_decode_latency(model, space, everything[chosen],
                                                   sc.latency_repeats)):
      decode[i] = v

  archs = decode_genomes(space, everything[:nf + 2])

  def entry(i, genome):
    return {'genome': [int(x) for x in genome],
            'arch': arch_lib.to_json(arch_at(archs, i)),
            'objectives': {n: rows[i][n] for n in fitness.names},
            'metrics': rows[i], 'heldout': held[i] if i < len(held) else None,
            'latency_ms': latency[i] if i < len(latency) else None,
            'decode_latency': decode[i] if i < len(decode) else None}

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
      'hypervolume_random_initial': float(hv_random), 'hypervolume_heldout': hv_heldout,
      'archive_size': sc.archive_size, 'selection_batches': len(batches), **heldout_info,
      'latency_batch': list(batch0), 'device': jax.devices()[0].device_kind,
      'eval_tokens': int(sum(float(np.sum(b['weights'])) for b in batches)),
      'front': [dict(index=k, **entry(k, g)) for k, g in enumerate(front_genomes)],
      'baselines': {'smallest': entry(nf, smallest), 'largest': entry(nf + 1, largest)},
      'random': [{'genome': [int(x) for x in g], 'metrics': rows[nf + 2 + j]}
                 for j, g in enumerate(random_genomes)],
  }
