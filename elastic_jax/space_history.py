"""The search space of a run whose training changes it (ELM's dynamic modules): the space the
arrays are allocated for, and its history in the workdir (`W/space_history.json`).

Width growth (`train.dynamic.growth_every > 0`) extends `space.ffn` with the widths growth can
reach, max(space.ffn) + k * step up to the cap (step and cap are fractions of the largest hidden
size), so the supernet's arrays are allocated at the cap from the start; head pruning
(`train.dynamic.prune_every > 0`) extends `space.heads` with every count below the largest, the
counts pruning can leave. The configured choices stay the *allowed* ones (`space.ffn_max`,
`space.heads_allowed`; see elastic_jax/space.py) until training changes them.

History file: {"initial": limits, "events": [{"step", "kind": "growth" | "prune", what changed,
"ffn_max", "heads_allowed"} ...], "measurements": [{"step", "pca"} ...]}; each event carries the
limits after it, so the space at step S is the last event's at or before S (what a run resumed
from the checkpoint of step S continues with). Every command that reads the workdir (search,
export, evaluate) builds the final space.
"""

from __future__ import annotations

import json
from pathlib import Path

from elastic_jax import atomic
from elastic_jax.errors import UserError

HISTORY_FILE = 'space_history.json'
_DEFAULTS = {'growth_every': 0, 'growth_step': 0.25, 'growth_cap': 1.5, 'prune_every': 0}


def settings(cfg) -> dict:
  """The `train.dynamic` fields that shape the space (defaults where absent)."""
  dyn = dict(cfg.get('train', {}).get('dynamic', {}) or {})
  return {k: dyn.get(k, v) for k, v in _DEFAULTS.items()}


def growth_widths(cfg) -> tuple[int, int, list[int]]:
  """(step, cap, the widths growth adds) in units, from the config's fractions of hidden."""
  s, space = settings(cfg), cfg['space']
  hidden = max(int(h) for h in space['hidden'])
  step, cap = round(float(s['growth_step']) * hidden), round(float(s['growth_cap']) * hidden)
  current = max(int(f) for f in space['ffn'])
  if step < 1:
    raise UserError(f'config field train.dynamic.growth_step={s["growth_step"]!r} gives an FFN '
                    f'growth step of {step} units (x hidden {hidden}); it must be positive')
  if cap < current:
    raise UserError(f'config field train.dynamic.growth_cap={s["growth_cap"]!r} (x hidden '
                    f'{hidden} = {cap}) is below the current largest FFN width {current} '
                    '(space.ffn); raise the cap or narrow space.ffn')
  return step, cap, list(range(current + step, cap + 1, step))


def _space_dict(cfg) -> dict:
  space = cfg['space']
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(space).items()}


def allocated_space(cfg) -> dict:
  """The `space` section the arrays are allocated for, with the configured choices as the
  initial limits (unchanged when no dynamic module is on)."""
  s = settings(cfg)
  space = _space_dict(cfg)
  growth, prune = int(s['growth_every']) > 0, int(s['prune_every']) > 0
  if not (growth or prune):
    return space
  num_layers, blocks = int(space['num_layers']), list(space.get('blocks', ('transformer',)))
  ffn = sorted(int(f) for f in space['ffn'])
  heads = sorted(int(h) for h in space['heads'])
  if growth:
    space['ffn_max'] = [[max(ffn)] * len(blocks) for _ in range(num_layers)]
    space['ffn'] = ffn + growth_widths(cfg)[2]
  if prune:
    if space.get('kv_groups'):
      raise UserError('head pruning (train.dynamic.prune_every) needs multi-head attention: '
                      'leave space.kv_groups empty, or set prune_every=0')
    if not space.get('head_dim'):  # keep the head size the configured largest count implies
      space['head_dim'] = [max(int(h) for h in space['hidden']) // max(heads)]
    if 'bottleneck' in blocks and not space.get('bottleneck_head_dim') and space.get('inner'):
      space['bottleneck_head_dim'] = max(int(i) for i in space['inner']) // max(heads)
    space['heads_allowed'] = [[heads] * len(blocks) for _ in range(num_layers)]
    space['heads'] = list(range(1, max(heads) + 1))
  return space


def initial_limits(cfg) -> dict:
  space = allocated_space(cfg)
  return {'ffn_max': space.get('ffn_max', []), 'heads_allowed': space.get('heads_allowed', [])}


def load(workdir: str | Path | None) -> dict | None:
  path = Path(workdir) / HISTORY_FILE if workdir else None
  if path is None or not path.is_file():
    return None
  try:
    history = json.loads(path.read_text())
    assert isinstance(history, dict) and isinstance(history['events'], list)
    return history
  except (json.JSONDecodeError, AssertionError, KeyError, TypeError) as e:
    raise UserError(f'{path} is not a valid space history ({e!r}); restore it, or delete it and '
                    'the checkpoints to train again') from None


def save(workdir: str | Path, history: dict) -> None:
  atomic.write_text(Path(workdir) / HISTORY_FILE, json.dumps(history, indent=1) + '\n')


def limits_at(history: dict, step: int | None = None) -> dict:
  """The limits after every event at or before `step` (None: the final ones)."""
  limits = history['initial']
  for event in history['events']:
    if step is None or event['step'] <= step:
      limits = {'ffn_max': event['ffn_max'], 'heads_allowed': event['heads_allowed']}
  return limits


def truncated(history: dict, step: int) -> dict:
  """The history as it was at `step` (a run resumed from that step's checkpoint)."""
  return {**history, 'events': [e for e in history['events'] if e['step'] <= step],
          'measurements': [m for m in history.get('measurements', []) if m['step'] <= step]}


def space_section(cfg, workdir: str | Path | None = None) -> dict:
  """The run's `space` section: allocated at the dynamic modules' extent, limited to the final
  space of the workdir's history (if any)."""
  space = allocated_space(cfg)
  history = load(workdir)
  if history is not None:
    limits = limits_at(history)
    for key in ('ffn_max', 'heads_allowed'):
      if limits[key]:
        space[key] = limits[key]
  return space
