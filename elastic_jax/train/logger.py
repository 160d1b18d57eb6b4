"""Training metrics: a JSONL file, TensorBoard event files (tensorboardX, no TensorFlow), and a
progress bar with tokens/s and ETA. Only process 0 writes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricLogger:
  def __init__(self, workdir: Path, *, enabled: bool, total: int, start: int,
               progress: bool = True):
    self.enabled = enabled
    self.path = Path(workdir) / 'metrics.jsonl'
    self.tb = self.bar = None
    self.last = (time.perf_counter(), start)
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    self.file = self.path.open('a')
    self.tb = SummaryWriter(str(Path(workdir) / 'tensorboard'))
    if progress:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True,
                      file=sys.stderr, mininterval=1.0)

  def info(self, message: str) -> None:
    if self.enabled:
      # stderr: stdout is the command's result (JSON); tqdm.write defaults to stdout.
      if self.bar is not None:
        self.bar.write(message, file=sys.stderr)
      else:
        print(message, file=sys.stderr, flush=True)

  def log(self, step: int, metrics: dict, tokens: int | None = None,
          show: dict | None = None, at: float | None = None) -> None:
    """Appends `metrics` to the JSONL and TensorBoard files; the bar shows `show` (named values)
    and the speed, or the validation metrics. `at` (a perf_counter time; default now) is when
    `step` was dispatched: the speed is measured between dispatches. Where a step runs inside
    the dispatching call (CPU), the times its metrics are read lag by a step, and the last step
    would look instantaneous."""
    if not self.enabled:
      return
    now = time.perf_counter() if at is None else at
    metrics = dict(metrics)
    if tokens is not None:
      t0, s0 = self.last
      if step > s0 and now > t0:
        metrics['tokens_per_s'] = tokens * (step - s0) / (now - t0)
      self.last = (now, step)
    self.file.write(json.dumps({'step': step, **metrics}) + '\n')
    self.file.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    if self.bar is not None:
      self.bar.n = step
      if show is None:
        show = {f'{k.split("/")[1]} val loss': v for k, v in metrics.items()
                if k.startswith('eval/') and k.endswith('/loss')}
      if 'tokens_per_s' in metrics:
        show = {**show, 'tok/s': metrics['tokens_per_s']}
      if show:
        self.bar.set_postfix({k: f'{v:.4g}' for k, v in show.items()}, refresh=True)

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      self.tb.close()
      if self.bar is not None:
        self.bar.close()
