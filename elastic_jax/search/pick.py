"""Choosing one architecture from the searched front, and exporting it.

  index:N                      the N-th front member (the order of pareto.json and the table:
                               increasing second objective, e.g. parameters)
  knee                         the knee of the front: in objectives normalised to [0, 1] over the
                               front, the point farthest below the chord joining the two extremes
                               (two objectives), or the point closest to the ideal point (more)
  best-under:params=N          the best first objective (e.g. lowest loss) among members whose
                               metric is <= N; several bounds with commas (params=5M,flops=20M);
                               N accepts k/M/G suffixes and 1e6 notation; metrics: any in
                               pareto.json's `metrics` and latency_ms
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from elastic_jax.errors import UserError

PICK_HELP = "index:N | knee | best-under:METRIC=N[,METRIC=N] (e.g. best-under:params=5M)"
_SUFFIX = {'k': 1e3, 'm': 1e6, 'g': 1e9, 't': 1e12}


def parse_number(text: str) -> float:
  """'5M' -> 5e6, '2.5k' -> 2500, '1e6' -> 1e6, '1_000_000' -> 1e6."""
  t = text.strip().replace('_', '').replace(',', '')
  scale = 1.0
  if t and t[-1].lower() in _SUFFIX:
    scale, t = _SUFFIX[t[-1].lower()], t[:-1]
  try:
    return float(t) * scale
  except ValueError:
    raise UserError(f'{text!r} is not a number (examples: 5000000, 5e6, 5M, 500k)') from None


def parse_pick(spec: str) -> tuple[str, object]:
  """('index', N) | ('knee', None) | ('best-under', {metric: bound})."""
  spec = (spec or '').strip()
  if spec == 'knee':
    return 'knee', None
  m = re.fullmatch(r'index:(-?\d+)', spec)
  if m:
    return 'index', int(m.group(1))
  if spec.startswith('best-under:'):
    bounds = {}
    for part in spec[len('best-under:'):].split(','):
      if '=' not in part:
        raise UserError(f'--pick {spec!r}: expected METRIC=N after best-under:, e.g. '
                        'best-under:params=5M')
      name, value = part.split('=', 1)
      bounds[name.strip()] = parse_number(value)
    return 'best-under', bounds
  raise UserError(f'--pick {spec!r} is not understood; use {PICK_HELP}')


def _metric(entry: Mapping, name: str):
  if name == 'latency_ms':
    return entry.get('latency_ms')
  return entry['metrics'].get(name)


def _minimised(pareto: Mapping) -> np.ndarray:
  """Front objective values [N, M], every column minimised."""
  names, maximize = pareto['objectives'], pareto['maximize']
  f = np.asarray([[e['objectives'][n] for n in names] for e in pareto['front']], np.float64)
  return f * np.where(np.asarray(maximize), -1.0, 1.0)


def knee_index(f_NxM: np.ndarray) -> int:
  """Knee of a front of minimised objectives (see the module docstring)."""
  n = f_NxM.shape[0]
  if n <= 2:
    return 0 if n == 1 else int(np.argmin(np.linalg.norm(_normalise(f_NxM), axis=1)))
  z = _normalise(f_NxM)
  if z.shape[1] == 2:
    a, b = z[np.argmin(z[:, 0])], z[np.argmin(z[:, 1])]
    chord = b - a
    length = np.linalg.norm(chord)
    if length > 0:
      # Signed distance below the chord (towards the ideal point (0, 0)).
      normal = np.array([chord[1], -chord[0]]) / length
      if normal @ (np.zeros(2) - a) < 0:
        normal = -normal
      return int(np.argmax((z - a) @ normal))
  return int(np.argmin(np.linalg.norm(z, axis=1)))


def _normalise(f_NxM: np.ndarray) -> np.ndarray:
  lo, hi = f_NxM.min(axis=0), f_NxM.max(axis=0)
  return (f_NxM - lo) / np.where(hi > lo, hi - lo, 1.0)


def choose(pareto: Mapping, spec: str) -> int:
  """Index into pareto['front'] of the member `spec` selects (UserError if none does)."""
  front = pareto['front']
  if not front:
    raise UserError('the search front is empty; rerun `elastic-jax search`')
  kind, arg = parse_pick(spec)
  if kind == 'index':
    if not -len(front) <= arg < len(front):
      raise UserError(f'--pick index:{arg} is out of range: the front has {len(front)} members '
                      f'(index:0 .. index:{len(front) - 1}; see W/search/summary.md)')
    return arg % len(front)
  if kind == 'knee':
    return knee_index(_minimised(pareto))
  ok = np.ones(len(front), bool)
  for name, bound in arg.items():
    values = [_metric(e, name) for e in front]
    if all(v is None for v in values):
      known = sorted(front[0]['metrics']) + ['latency_ms']
      raise UserError(f'--pick best-under:{name}=...: no front member has a {name!r} value; '
                      f'use one of {", ".join(known)}')
    values = np.asarray([np.inf if v is None else v for v in values], np.float64)
    if not np.any(values <= bound):
      smallest = pareto.get('baselines', {}).get('smallest', {})
      space_min = _metric(smallest, name) if smallest else None
      where = (f'; the smallest architecture of the search space has {space_min:,.6g}'
               if space_min is not None else '')
      budgetable = name in ('params', 'flops', 'kv_cache', 'activation_memory')
      budget = (f' (or search under it: --config.search.budgets.{name}={bound:.6g})'
                if budgetable and (space_min is None or bound >= space_min) else '')
      raise UserError(f'no architecture on the front has {name} <= {bound:,.6g}: the smallest '
                      f'on the front has {np.min(values):,.6g}{where}; raise the bound'
                      f'{budget}')
    ok &= values <= bound
  if not ok.any():
    raise UserError(f'no front member meets all of {arg} together; relax one of them')
  first = _minimised(pareto)[:, 0]
  return int(np.flatnonzero(ok)[np.argmin(first[ok])])


def export_pick(cfg, workdir: str | Path, spec: str, out: str | Path | None = None,
                fmt: str = 'native', overwrite: bool = False) -> dict:
  """Exports the front member `spec` selects to `out` (default W/export/front_<index>) as `fmt`
  ('native' or 'hf'); an existing `out` is replaced only when it is an earlier export and
  `overwrite` is set.

  The weights come from W's trained supernet; the result notes when its training step differs
  from the one the search measured the front on.
  """
  from elastic_jax import arch as arch_lib  # noqa: PLC0415
  from elastic_jax import export as export_lib  # noqa: PLC0415
  from elastic_jax.search.job import load_trained_supernet  # noqa: PLC0415
  from elastic_jax.search.report import load_pareto  # noqa: PLC0415
  from elastic_jax.workdir import build_space, save_export  # noqa: PLC0415

  pareto = load_pareto(workdir)
  index = choose(pareto, spec)
  entry = pareto['front'][index]
  space = build_space(cfg, workdir)
  arch = arch_lib.from_json(entry['arch'], space.cfg)
  out = Path(out) if out else Path(workdir) / 'export' / f'front_{index}'
  export_lib.check_out(out, overwrite)  # before the supernet is read
  model, step = load_trained_supernet(cfg, workdir, space,
                                      allow_untrained=pareto.get('supernet_step') is None)
  dense = export_lib.export(model, space.cfg, arch)
  search_info = {'pick': spec, 'index': index, 'objectives': entry['objectives'],
                 'metrics': entry['metrics'], 'latency_ms': entry.get('latency_ms'),
                 'decode_latency': entry.get('decode_latency'),
                 'searched_at_supernet_step': pareto.get('supernet_step')}
  data_cfg = cfg.data.to_dict() if hasattr(cfg.data, 'to_dict') else dict(cfg.data)
  from elastic_jax.hf.importer import original_hf_config  # noqa: PLC0415
  from elastic_jax.scone.job import export_table_of_run  # noqa: PLC0415
  saved = save_export(
      dense, out, cfg.data, arch=arch, fmt=fmt, hf_base=original_hf_config(cfg),
      overwrite=overwrite, extra={'data': data_cfg, 'supernet_step': step, 'search': search_info},
      scone_table=export_table_of_run(cfg, model, workdir, arch))
  result = {**saved, 'index': index, 'pick': spec, 'supernet_step': step,
            'objectives': entry['objectives'], 'latency_ms': entry.get('latency_ms'),
            'decode_latency': entry.get('decode_latency')}
  if step != pareto.get('supernet_step'):
    result['warning'] = (f'the supernet is now at step {step} but the front was measured at step '
                         f"{pareto.get('supernet_step')}; rerun `elastic-jax search` to refresh it")
  return result
