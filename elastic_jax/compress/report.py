"""The compression report: W/compress/summary.json, summary.md and front.png."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from elastic_jax import atomic

# (a), (b): the pruning rule at the searched model's parameter count; (a'), (b'): at the budget.
ROWS = (('search', 'searched'), ('pruned', 'pruned (a)'),
        ('pruned_finetuned', 'pruned + fine-tuned (b)'),
        ('budget_pruned', "pruned at the budget (a')"),
        ('budget_pruned_finetuned', "pruned at the budget + fine-tuned (b')"))


def markdown(summary: Mapping) -> str:
  o = summary['original']
  lines = [
      '# Compression by search', '',
      f"Source: `{summary['source']}`. Perplexity on {summary['eval_data']}. Every model got "
      f"{summary['finetune_steps']} fine-tuning steps ({summary['finetune_tokens']:,} tokens) "
      'from the same teacher (baseline (a): none).', '',
      '| budget | model | params | perplexity | latency (ms) |', '|---|---|---|---|---|',
      f"| - | original | {o['params']:,} | {o['ppl']:.3f} | {o['latency_ms']:.2f} |",
  ]
  for label, entry in summary['budgets'].items():
    for key, name in ROWS:
      if key in entry:
        m = entry[key]
        lines.append(f"| params <= {label} | {name} | {m['params']:,} | {m['ppl']:.3f} | "
                     f"{m['latency_ms']:.2f} |")
  lines += ['', f"Hypervolume of (perplexity, params) below {summary['hv_ref']}: search "
            f"{summary['hv_search']:.6g}, pruning (b) {summary['hv_pruning']:.6g}, pruning (a) "
            f"{summary['hv_pruned_only']:.6g}"
            + (f", pruning at the budget (b') {summary['hv_budget_pruning']:.6g}"
               if 'hv_budget_pruning' in summary else '') + '.', '',
            '![front](front.png)', '']
  return '\n'.join(lines)


def plot(path: Path, summary: Mapping, pareto: Mapping) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
  front = pareto.get('front', [])
  if front and 'loss' in front[0]['metrics']:
    x = np.asarray([e['metrics']['params'] for e in front]) / 1e6
    y = np.exp([e['metrics']['loss'] for e in front])
    ax.plot(x, y, '-o', c='0.6', ms=3, lw=1, label='searched front (supernet weights)')
  for (key, name), marker, color in zip(ROWS, ('o', 'v', '^', 'x', 's'),
                                        ('C0', 'C3', 'C2', 'C1', 'C4'), strict=True):
    pts = [e[key] for e in summary['budgets'].values() if key in e]
    if pts:
      ax.scatter([p['params'] / 1e6 for p in pts], [p['ppl'] for p in pts], marker=marker, s=50,
                 c=color, label=name, zorder=3)
  o = summary['original']
  ax.scatter([o['params'] / 1e6], [o['ppl']], marker='*', s=120, c='k', label='original',
             zorder=4)
  ax.set_xlabel('parameters (M)')
  ax.set_ylabel('perplexity (held-out)')
  ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = path.with_name(f'.{path.name}.tmp.png')
  fig.savefig(tmp)
  plt.close(fig)
  tmp.replace(path)


def write(out_dir: Path, summary: Mapping, pareto: Mapping) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  atomic.write_text(out_dir / 'summary.json', json.dumps(summary, indent=2, default=str) + '\n')
  plot(out_dir / 'front.png', summary, pareto)
  atomic.write_text(out_dir / 'summary.md', markdown(summary))
