"""Search outputs: pareto.json, history.jsonl, pareto.png, summary.md, and the front as a table.

Everything here reads the plain `pareto` dict that `pareto.build_pareto` returns (and pareto.json
stores), so a report can be rebuilt from the files alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from elastic_jax import atomic
from elastic_jax.search.objectives import OBJECTIVES

PARETO_FILE = 'pareto.json'
HISTORY_FILE = 'history.jsonl'
PLOT_FILE = 'pareto.png'
SUMMARY_FILE = 'summary.md'

# Columns of the front table: (metric, header, scale, format).
_COLUMNS = (
    ('loss', 'loss', 1.0, '{:.4f}'),
    ('perplexity', 'ppl', 1.0, '{:.2f}'),
    ('params', 'params (M)', 1e6, '{:.3f}'),
    ('flops', 'MFLOP/tok', 1e6, '{:.2f}'),
    ('kv_cache', 'KV kB/tok', 1e3, '{:.2f}'),
)


def _write(path: Path, text: str) -> None:
  atomic.write_text(path, text)


def _finite(x):
  """JSON has no inf/NaN: None instead."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _clean(obj):
  if isinstance(obj, Mapping):
    return {k: _clean(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [_clean(v) for v in obj]
  if isinstance(obj, np.generic):
    return _clean(obj.item())
  return _finite(obj)


def history_rows(history: Mapping[str, np.ndarray], names: Sequence[str]) -> list[dict]:
  rows = []
  for t in range(len(history['n_evals'])):
    rows.append({
        'generation': t + 1, 'n_evals': int(history['n_evals'][t]),
        'best': {n: float(history['best'][t][m]) for m, n in enumerate(names)},
        'hypervolume': float(history['hv'][t]), 'front_size': int(history['front_size'][t]),
        'feasible': int(history['feasible'][t]), 'seconds': round(float(history['seconds'][t]), 3),
    })
  return rows


def write_history(path: Path, history: Mapping[str, np.ndarray], names: Sequence[str]) -> None:
  """history.jsonl: one JSON object per generation (rewritten whole, atomically)."""
  lines = [json.dumps(_clean(r)) for r in history_rows(history, names)]
  _write(Path(path), '\n'.join(lines) + '\n')


def arch_summary(arch: Mapping) -> str:
  """One line: global sizes, then each active layer (t = transformer heads/kv:ffn,
  b = bottleneck heads/kv:ffn/inner); skipped layers are left out."""
  layers = []
  for layer in arch['layers'][:arch['depth']]:
    if layer['block'] == 'skip':
      continue
    s = f"{layer['block'][0]}{layer['heads']}/{layer['kv_groups']}:{layer['ffn']}"
    if layer['block'] == 'bottleneck':
      s += f"/{layer['inner']}"
    layers.append(s)
  return f"h{arch['hidden']} d{len(layers)} hd{arch['head_dim']} [{' '.join(layers)}]"


def _columns(pareto: Mapping) -> list[tuple]:
  present = set(pareto['front'][0]['metrics']) if pareto['front'] else set()
  cols = [c for c in _COLUMNS if c[0] in present]
  for name in pareto['objectives']:
    if name not in [c[0] for c in cols]:
      obj = OBJECTIVES.get(name)
      scale = obj.unit_scale if obj else 1.0
      cols.append((name, name + (f' ({obj.unit})' if obj and obj.unit else ''), scale, '{:.4g}'))
  # The same metrics on the held-out batches (the search never saw them), beside the loss.
  heldout = set((pareto['front'][0].get('heldout') or {}) if pareto['front'] else ())
  at = next((i + 1 for i, c in enumerate(cols) if c[0] == 'perplexity'), len(cols))
  extra = [(f'heldout:{k}', f'held-out {h}', sc, f) for k, h, sc, f in cols
           if k in heldout and k in ('loss', 'perplexity')]
  return cols[:at] + extra + cols[at:]


def _value(entry: Mapping, key: str):
  if key.startswith('heldout:'):
    return (entry.get('heldout') or {}).get(key[len('heldout:'):])
  return entry['metrics'].get(key)


def table_rows(pareto: Mapping, with_baselines: bool = False) -> tuple[list[str], list[list[str]]]:
  cols = _columns(pareto)
  entries = [(str(e['index']), e) for e in pareto['front']]
  if with_baselines:
    entries += [(k, e) for k, e in pareto['baselines'].items()]
  decode = any(e.get('decode_latency') for _, e in entries)  # decoders only
  header = (['#'] + [c[1] for c in cols] + ['latency ms']
            + (['prefill ms', 'ms/token'] if decode else []) + ['architecture'])
  rows = []
  for label, e in entries:
    values = [_value(e, k) for k, _, _, _ in cols]
    row = [label] + [fmt.format(v / scale) if v is not None else '-'
                     for v, (_, _, scale, fmt) in zip(values, cols)]
    row.append('-' if e.get('latency_ms') is None else f"{e['latency_ms']:.3f}")
    if decode:
      d = e.get('decode_latency')
      row += ['-', '-'] if not d else [f"{d['prefill_ms']:.2f}", f"{d['per_token_ms']:.3f}"]
    row.append(arch_summary(e['arch']))
    rows.append(row)
  return header, rows


def format_table(pareto: Mapping, markdown: bool = False, with_baselines: bool = False) -> str:
  """The front as an aligned text table (or a markdown table)."""
  header, rows = table_rows(pareto, with_baselines)
  if markdown:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  fmt = lambda r: '  '.join(c.rjust(w) if i < len(r) - 1 else c
                            for i, (c, w) in enumerate(zip(r, widths)))
  return '\n'.join([fmt(header)] + [fmt(r) for r in rows])


def _axis(name: str) -> tuple[str, float]:
  obj = OBJECTIVES.get(name)
  if obj is None:
    return name, 1.0
  return (f'{name} ({obj.unit})' if obj.unit else name), obj.unit_scale


def _outside_budgets(entry: Mapping, budgets: Mapping) -> list[str]:
  """The budgets an entry's metrics exceed, as 'params 0.92M > 0.3M'-style strings."""
  return [f'{k} {entry["metrics"][k]:.4g} > {v:.4g}' for k, v in budgets.items()
          if entry['metrics'].get(k) is not None and entry['metrics'][k] > v]


def _label_points(ax, x, y, min_gap: float = 0.04) -> None:
  """Numbers the front's points, leaving out a label that would overlap an earlier one (closer
  than `min_gap` of the axes in both directions)."""
  if not len(x):
    return
  span = lambda v: (np.ptp(v) or 1.0)
  nx, ny = (x - np.min(x)) / span(x), (y - np.min(y)) / span(y)
  placed: list[tuple[float, float]] = []
  for i in range(len(x)):
    if any(abs(nx[i] - px) < min_gap and abs(ny[i] - py) < min_gap for px, py in placed):
      continue
    placed.append((nx[i], ny[i]))
    ax.annotate(str(i), (x[i], y[i]), textcoords='offset points', xytext=(4, 4), fontsize=7)


def plot(path: Path, pareto: Mapping) -> Path:
  """Writes pareto.png (`pareto_figure`) atomically."""
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig = pareto_figure(pareto)
  try:
    return atomic.write_file(path, fig.savefig)
  finally:
    plt.close(fig)


def pareto_figure(pareto: Mapping):
  """Objective 0 (y) against objective 1 (x; params for a single objective), the budgets as
  dashed lines; baselines outside the budgets are named in the legend, not drawn (they would
  stretch the axes far beyond every searched point). The hypervolume is given for two or more
  objectives only (for one it is just the best value)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  names = pareto['objectives']
  y_name = names[0]
  x_name = names[1] if len(names) > 1 else 'params'
  (x_label, x_scale), (y_label, y_scale) = _axis(x_name), _axis(y_name)
  if pareto['maximize'][0]:
    y_label += ' (higher is better)'
  budgets = dict(pareto.get('budgets') or {})
  xy = lambda entries: (np.asarray([e['metrics'][x_name] for e in entries], float) / x_scale,
                        np.asarray([e['metrics'][y_name] for e in entries], float) / y_scale)
  fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
  if pareto['random']:
    x, y = xy(pareto['random'])
    ax.scatter(x, y, s=14, c='0.7', label=f'random architectures ({len(x)}, first generation)')
  x, y = xy(pareto['front'])
  what = 'Pareto front' if len(names) > 1 else f'best {y_name} per size'
  ax.plot(x, y, '-o', c='C0', ms=5, lw=1.2, label=f'{what} ({len(x)}, {pareto["strategy"]})')
  _label_points(ax, x, y)
  for (label, e), marker, color in zip(pareto['baselines'].items(), ('v', '^'), ('C3', 'C2')):
    outside = _outside_budgets(e, budgets)
    if outside:
      ax.scatter([], [], marker=marker, s=60, c=color,
                 label=f'{label} architecture: outside the budget ({outside[0]}), not shown')
      continue
    bx, by = xy([e])
    ax.scatter(bx, by, marker=marker, s=60, c=color, label=f'{label} architecture', zorder=3)
  for name, bound in budgets.items():
    if name == x_name:
      ax.axvline(bound / x_scale, ls='--', c='C3', lw=1, label=f'budget: {name} <= {bound:.4g}')
    elif name == y_name:
      ax.axhline(bound / y_scale, ls='--', c='C3', lw=1, label=f'budget: {name} <= {bound:.4g}')
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label)
  title = f"{pareto['n_evals']} evaluations"
  if len(names) > 1:
    title += f", hypervolume {pareto['hypervolume']:.4g}"
  elif len(y):
    best = np.max(y) if pareto['maximize'][0] else np.min(y)
    title += f', best {y_name} {best * y_scale:.4g}'
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def summary_markdown(pareto: Mapping, history: Mapping[str, np.ndarray] | None = None) -> str:
  names = pareto['objectives']
  aps = pareto.get('archs_per_second')
  decoded = [e['decode_latency'] for e in [*pareto['front'], *pareto['baselines'].values()]
             if e.get('decode_latency')]
  lines = [
      '# Architecture search', '',
      f"- objectives: {', '.join(n + (' (max)' if mx else '') for n, mx in zip(names, pareto['maximize']))}",  # noqa: E501
      f"- strategy: {pareto['strategy']}, population {pareto['pop_size']}, "
      f"{pareto['n_children']} evaluations per generation, {pareto['generations']} generations, "
      f"{pareto['n_evals']} evaluations (distinct architectures)"
      + (f' in {pareto["search_seconds"]:.1f} s ({aps:.1f} archs/s incl. compile)' if aps else ''),
      f"- budgets: {pareto['budgets'] or 'none'}; seed {pareto['seed']}; supernet step "
      f"{pareto['supernet_step']}",
      f"- validation tokens per evaluation: {pareto['eval_tokens']}",
      *([f"- held-out: the front and baselines re-scored on {pareto['heldout_batches']} "
         f"validation batches ({pareto['heldout_tokens']} tokens) the search never scored with "
         "(columns 'held-out ...'; the others are the values that selected them)"
         + (f"; hypervolume on them {pareto['hypervolume_heldout']:.6g}"
            if len(names) > 1 and pareto.get('hypervolume_heldout') is not None else '')]
        if pareto.get('heldout_batches') else []),
      *([f"- hypervolume of the front: **{pareto['hypervolume']:.6g}** (random first "
         f"generation: {pareto['hypervolume_random_initial']:.6g}); reference point "
         f"{dict(zip(names, pareto['ref_point']))}"] if len(names) > 1 else []),
      f"- latency: one forward of a {pareto['latency_batch']} batch, exported dense model, "
      f"{pareto['device']}"
      + ('; decode: KV-cache generation of one row (elastic_jax.generate), prefill of a '
         f"{decoded[0]['prompt_tokens']}-token prompt and ms per token over "
         f"{decoded[0]['new_tokens']} new tokens" if decoded else ''),
      '', '## Front', '', format_table(pareto, markdown=True, with_baselines=True), '',
      f'![Pareto front]({PLOT_FILE})', '',
      'Export one: `elastic-jax export --workdir W --pick index:N` (or `knee`, or '
      '`best-under:params=N`).', '']
  if history is not None and len(history['n_evals']):
    multi = len(names) > 1
    lines += ['## History', '', '| generation | evaluations | '
              + ' | '.join(f'best {n}' for n in names)
              + (' | hypervolume | front |' if multi else ' |'),
              '|' + '---|' * (2 + len(names) + 2 * multi)]
    for t in range(len(history['n_evals'])):  # every generation
      lines.append(f"| {t + 1} | {int(history['n_evals'][t])} | "
                   + ' | '.join(f'{v:.4g}' for v in history['best'][t])
                   + (f" | {history['hv'][t]:.4g} | {int(history['front_size'][t])} |"
                      if multi else ' |'))
    lines.append('')
  return '\n'.join(lines)


def write_all(out_dir: Path, pareto: Mapping, history: Mapping[str, np.ndarray],
              names: Sequence[str], *, only_missing: bool = False) -> dict[str, str]:
  """Writes pareto.json, history.jsonl, pareto.png and summary.md (with `only_missing`, only
  those that do not exist); returns their paths."""
  out_dir = Path(out_dir)
  writers = {
      PARETO_FILE: lambda p: _write(p, json.dumps(_clean(pareto), indent=1) + '\n'),
      HISTORY_FILE: lambda p: write_history(p, history, names),
      PLOT_FILE: lambda p: plot(p, pareto),
      SUMMARY_FILE: lambda p: _write(p, summary_markdown(pareto, history)),
  }
  for name, write in writers.items():
    if not (only_missing and (out_dir / name).is_file()):
      write(out_dir / name)
  return output_paths(out_dir)


def output_paths(out_dir: Path) -> dict[str, str]:
  """Where `write_all` writes (what the processes that write nothing report)."""
  out_dir = Path(out_dir)
  return {'pareto_json': str(out_dir / PARETO_FILE), 'history': str(out_dir / HISTORY_FILE),
          'plot': str(out_dir / PLOT_FILE), 'summary': str(out_dir / SUMMARY_FILE)}


def load_finished(out_dir: Path, digest: str) -> dict | None:
  """pareto.json when it holds the results `digest` names (see `checkpoint.results_digest`), else
  None."""
  try:
    pareto = json.loads((Path(out_dir) / PARETO_FILE).read_text())
  except (OSError, ValueError):
    return None
  return pareto if isinstance(pareto, dict) and pareto.get('results_digest') == digest else None


def load_pareto(workdir) -> dict:
  from elastic_jax.errors import read_json  # noqa: PLC0415
  path = Path(workdir) / 'search' / PARETO_FILE
  return read_json(path, f'{path} does not exist: run `elastic-jax search --workdir={workdir}` '
                   'first', 'rerun `elastic-jax search`')
