"""The training-curve plot of a run, W/training.png: the train and validation loss of the largest
and smallest sub-networks (or of the one architecture a `train.arch` run trains) over the steps,
read from W/metrics.jsonl, so it can be redrawn from the files alone."""

from __future__ import annotations

import json
from pathlib import Path

from elastic_jax import atomic

PLOT_FILE = 'training.png'
METRICS_FILE = 'metrics.jsonl'


def training_series(workdir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
  """{'train/largest': (steps, cross-entropies), 'eval/largest': (steps, losses), ...}.

  A resumed run appends to metrics.jsonl and may repeat steps: the last value of a step wins.
  """
  path = Path(workdir) / METRICS_FILE
  values: dict[str, dict[int, float]] = {}
  if path.is_file():
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      step = record.get('step')
      for key, value in record.items():
        parts = key.split('/')
        if len(parts) != 3 or not isinstance(value, int | float):
          continue
        split, name, metric = parts
        if name.startswith(('random', 'sampled')):
          continue  # a different sub-network at every step (Sampler.labels): not one curve
        if (split, metric) in (('train', 'ce'), ('eval', 'loss')):
          values.setdefault(f'{split}/{name}', {})[step] = float(value)
  return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in sorted(values.items())}


def plot_training(workdir: str | Path) -> Path | None:
  """Writes W/training.png (atomically); None when there is nothing to plot yet."""
  series = training_series(workdir)
  if not series:
    return None
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  names = sorted({k.split('/')[1] for k in series}, key=lambda n: (n != 'largest', n))
  for i, name in enumerate(names):
    color = f'C{i}'
    if f'train/{name}' in series:
      steps, ce = series[f'train/{name}']
      ax.plot(steps, ce, '-', c=color, lw=1.0, alpha=0.8, label=f'{name}: train cross-entropy')
    if f'eval/{name}' in series:
      steps, loss = series[f'eval/{name}']
      ax.plot(steps, loss, 'o--', c=color, ms=5, lw=1.4, label=f'{name}: validation loss')
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.set_title(f'training of {Path(workdir).name}')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  try:
    return atomic.write_file(Path(workdir) / PLOT_FILE, fig.savefig)
  finally:
    plt.close(fig)
