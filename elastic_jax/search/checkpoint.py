"""The search checkpoint (W/search/state.npz): the compiled state (population, archive), the
generation, the key, the history; and the fingerprint of the settings it may be resumed with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
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


def fingerprint(cfg, sc: SearchConfig, space, supernet_step) -> str:
  """The settings a checkpoint must share to be resumed (not: generations, chunking, latency)."""
  as_dict = lambda c: c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c or {})
  data_cfg = as_dict(cfg.get('data', {}))
  uses_proxy = any(get_objective(n).prepare for n in sc.objectives)
  proxy_cfg = as_dict(cfg.get('proxy', {})) if uses_proxy else {}
  return json.dumps({
      'objectives': list(sc.objectives), 'strategy': resolve_strategy(sc),
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
                     sc.holdout_batches])
  return hashlib.sha256(text.encode()).hexdigest()[:16]
