"""The training logger's speed: tokens per second between the times steps were dispatched."""

import json

from elastic_jax.train.logger import MetricLogger


def test_speed_is_measured_between_the_given_dispatch_times(tmp_path):
  logger = MetricLogger(tmp_path, enabled=True, total=8, start=0, progress=False)
  logger.log(1, {'loss': 1.0}, tokens=100, at=1000.0)  # the first window holds compilation
  logger.log(2, {'loss': 1.0}, tokens=100, at=1000.5)
  logger.log(4, {'loss': 1.0}, tokens=100, at=1001.5)  # log_every=2: two steps in one window
  logger.log(4, {'eval/largest/loss': 2.0})  # no tokens: no speed, the window is kept
  # The trainer reads step k's metrics after dispatching step k+1; where a step runs inside
  # its call, reading times lag by a step and the last one came ~0 s after the one before it.
  logger.log(5, {'loss': 1.0}, tokens=100, at=1002.0)
  logger.close()
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  speeds = [(d['step'], d.get('tokens_per_s')) for d in lines]
  assert speeds[1:] == [(2, 200.0), (4, 200.0), (4, None), (5, 200.0)]
