"""The search checkpoint (W/search/state.npz): the compiled state (population, archive), the
generation, the key, the history; and the fingerprint of the settings it may be resumed with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from elastic_jax import atomic
from elastic_jax.errors import UserError
from elastic_jax.search import state as state_lib
from elastic_jax.search.config import SearchConfig, n_children_of, resolve_strategy, strategy_kwargs
from elastic_jax.search.objectives import get_objective

CHECKPOINT_FILE = 'state.npz'

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

  @classmethod
  def start(cls, state: state_lib.SearchState, seed: int, ref: np.ndarray, n_objectives: int,
            fp: str) -> Progress:
    """A search at generation 0 from `state` (its population seeded, its archive too)."""
    history = {'best': np.zeros((0, n_objectives)), 'n_evals': np.zeros(0, np.int64),
               'hv': np.zeros(0), 'front_size': np.zeros(0, np.int64),
               'feasible': np.zeros(0, np.int64), 'seconds': np.zeros(0)}
    return cls(state=state, generation=0, key=jax.random.key(seed), ref=ref, history=history,
               initial=None, fingerprint=fp)

  def record(self, state: state_lib.SearchState, h: dict, seconds: float, fitness,
             warmup_generations: int, generations: int) -> None:
    """Appends `driver.Searcher.advance`'s history `h` of n generations that took `seconds`,
    and keeps the population after the random warm-up generations (the report's baseline)."""
    from elastic_jax.search import pareto  # noqa: PLC0415
    g0, n = self.generation, len(h['n_evals'])
    snap = min(warmup_generations, generations) - 1
    if self.initial is None and g0 <= snap < g0 + n:
      i = snap - g0
      self.initial = {'genomes': h['genomes'][i], 'fitness': h['fitness'][i],
                      'mask': h['mask'][i]}
    ref_min = fitness.to_minimised(self.ref)
    prev_seconds = self.history['seconds'][-1] if len(self.history['seconds']) else 0.0
    new = {'best': fitness.to_natural(h['best']), 'n_evals': h['n_evals'].astype(np.int64),
           'hv': pareto.hypervolumes(h['fitness'], h['mask'], ref_min),
           'front_size': pareto.front_sizes(h['fitness'], h['mask']),
           'feasible': h['mask'].sum(axis=1).astype(np.int64),
           'seconds': prev_seconds + seconds * (np.arange(1, n + 1) / n)}
    self.history = {k: np.concatenate([self.history[k], new[k]]) for k in new}
    self.state = state
    self.generation = g0 + n

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
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise UserError(f'{path} is not a readable search checkpoint ({e}); delete it or set '
                      'search.resume=False') from None
    missing = [k for k in _STATE_FIELDS if f'state_{k}' not in a]
    if missing:
      raise UserError(f'{path} was written by an older version (no {missing[0]}); delete it or '
                      'set search.resume=False to start the search over')
    state = state_lib.SearchState(**{k: jnp.asarray(a[f'state_{k}']) for k in _STATE_FIELDS})
    initial = ({k: a[f'initial_{k}'] for k in ('genomes', 'fitness', 'mask')}
               if 'initial_genomes' in a else None)
    return cls(state=state, generation=int(a['generation']),
               key=jax.random.wrap_key_data(jnp.asarray(a['key_data'])),
               ref=a['ref'], history={k: a[f'history_{k}'] for k in _HISTORY_KEYS},
               initial=initial, fingerprint=str(a['fingerprint']))


def resume(path: Path, fp: str, generations: int, supernet_step, log) -> Progress | None:
  """The checkpoint at `path` if it holds this search (fingerprint `fp`); None when there is
  none or it was made with older weights of the same supernet (its values are stale); a
  UserError when it comes from another search."""
  if not path.is_file():
    return None
  progress = Progress.load(path)
  if progress.fingerprint != fp:
    changed = fingerprint_diff(progress.fingerprint, fp)
    if changed != ['supernet_step']:
      raise UserError(
          f'{path} comes from a different search (changed: {", ".join(changed)}); set '
          'search.resume=False to start over (it is overwritten), or use another workdir')
    log(f'search: the supernet was trained further (now step {supernet_step}) since '
        f'{path} was written; starting the search over')
    return None
  log(f'search: resuming {path} at generation {progress.generation}/{generations}')
  return progress


def fingerprint(cfg, sc: SearchConfig, space, supernet_step) -> str:
  """The settings a checkpoint must share to be resumed (not: generations, chunking, latency)."""
  as_dict = lambda c: c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c or {})
  data_cfg = as_dict(cfg.get('data', {}))
  uses_proxy = any(get_objective(n).prepare for n in sc.objectives)
  proxy_cfg = as_dict(cfg.get('proxy', {})) if uses_proxy else {}
  # The seed architectures by content (absent without seeds: older checkpoints stay resumable).
  seeds = ({'seed_archs': hashlib.sha256(Path(sc.seed_archs).read_bytes()).hexdigest()}
           if sc.seed_archs and Path(sc.seed_archs).is_file() else {})
  return json.dumps({
      **seeds, 'objectives': list(sc.objectives), 'strategy': resolve_strategy(sc),
      'pop_size': sc.pop_size, 'n_children': n_children_of(sc), 'budgets': dict(sc.budgets),
      'archive_size': sc.archive_size,
      'ref_point': list(sc.ref_point), 'seed_extremes': sc.seed_extremes, 'strategy_kwargs': {
          k: v for k, v in strategy_kwargs(sc, space).items() if isinstance(v, int | float)},
      'seed': sc.seed, 'supernet_step': supernet_step, 'proxy': proxy_cfg,
      'model': dataclasses.asdict(space.model), 'space': dataclasses.asdict(space.cfg),
      'data': {k: v for k, v in dict(data_cfg).items()
               if k not in ('cache_dir', 'num_workers', 'shuffle')},
  }, sort_keys=True, default=str)


def fingerprint_diff(old: str, new: str) -> list[str]:
  a, b = json.loads(old), json.loads(new)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def results_digest(fp: str, sc: SearchConfig, generations: int) -> str:
  """Identifies a finished search's results: its settings, its length, the report settings."""
  text = json.dumps([fp, generations, sc.latency, sc.latency_max, sc.latency_repeats,
                     sc.holdout_batches, sc.decode_latency_max])
  return hashlib.sha256(text.encode()).hexdigest()[:16]
