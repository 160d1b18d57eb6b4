"""GLUE task metrics, as GLUE reports them (NumPy, no scikit-learn needed)."""

from __future__ import annotations

import numpy as np

from elastic_jax.data.glue_tasks import GlueTask


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
  return float(np.mean(np.asarray(pred) == np.asarray(label)))


def f1(pred: np.ndarray, label: np.ndarray) -> float:
  """F1 of the positive class (label 1); 0 when there is no true positive."""
  pred, label = np.asarray(pred) == 1, np.asarray(label) == 1
  tp = float(np.sum(pred & label))
  if tp == 0:
    return 0.0
  return 2 * tp / (float(np.sum(pred)) + float(np.sum(label)))


def matthews(pred: np.ndarray, label: np.ndarray) -> float:
  """Matthews correlation (multi-class form of Gorodkin 2004); 0 when undefined."""
  pred, label = np.asarray(pred), np.asarray(label)
  classes = np.union1d(pred, label)
  confusion = np.zeros((len(classes), len(classes)), np.float64)
  np.add.at(confusion, (np.searchsorted(classes, label), np.searchsorted(classes, pred)), 1)
  t_k, p_k = confusion.sum(1), confusion.sum(0)
  c, s = np.trace(confusion), confusion.sum()
  denom = np.sqrt((s * s - p_k @ p_k) * (s * s - t_k @ t_k))
  return float((c * s - t_k @ p_k) / denom) if denom > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  x = np.asarray(x, np.float64) - np.mean(x)
  y = np.asarray(y, np.float64) - np.mean(y)
  denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks from 1, ties given their average rank."""
  x = np.asarray(x)
  order = np.argsort(x, kind='stable')
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  return pearson(_ranks(x), _ranks(y))


def task_metrics(task: GlueTask, pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
  """The task's metrics; 'score' is the one GLUE ranks by (the mean of two for MRPC, QQP and
  STS-B, as the GLUE leaderboard averages them), in [-1, 1] or [0, 1]."""
  if task.is_regression:
    out = {'pearson': pearson(pred, label), 'spearman': spearman(pred, label)}
    return out | {'score': (out['pearson'] + out['spearman']) / 2}
  if task.name == 'cola':
    out = {'matthews': matthews(pred, label)}
    return out | {'score': out['matthews']}
  out = {'accuracy': accuracy(pred, label)}
  if task.metric == 'f1':
    out['f1'] = f1(pred, label)
    return out | {'score': (out['f1'] + out['accuracy']) / 2}
  return out | {'score': out['accuracy']}
