"""How well a proxy ranks architectures: Kendall's tau-b against a measured quantity, and the
proxy-vs-loss scatter the training-free search notebook shows."""

from __future__ import annotations

import numpy as np


def kendall_tau(x, y) -> float:
  """Kendall's tau-b (ties in either variable corrected for), by comparing every pair: O(N^2),
  meant for the tens to thousands of architectures a proxy study scores."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
    raise ValueError(f'kendall_tau needs two equal 1-D arrays of >= 2 values, got {x.shape} and '
                     f'{y.shape}')
  i, j = np.triu_indices(len(x), k=1)
  dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
  denominator = np.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))
  return float(np.sum(dx * dy) / denominator) if denominator else float('nan')


def ranking_figure(proxy_P, loss_P, params_P, proxy_name: str, loss_label: str):
  """Scatter of loss (y) against the proxy (x), coloured by parameter count; the title gives
  Kendall's tau (a good proxy for a loss is strongly negative: higher score, lower loss)."""
  import matplotlib.pyplot as plt  # noqa: PLC0415

  proxy_P, loss_P = np.asarray(proxy_P, float), np.asarray(loss_P, float)
  fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
  points = ax.scatter(proxy_P, loss_P, c=np.asarray(params_P, float) / 1e6, cmap='viridis', s=30)
  fig.colorbar(points, ax=ax, label='parameters (M)')
  ax.set_xlabel(proxy_name)
  ax.set_ylabel(loss_label)
  ax.set_title(f'{proxy_name} vs {loss_label}: Kendall tau = {kendall_tau(proxy_P, loss_P):.3f} '
               f'({len(proxy_P)} architectures)', fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig
