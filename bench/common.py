"""Shared plumbing of the bench scripts: timing, result files (JSON + markdown table)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax

from elastic_jax import atomic

RESULTS = Path(__file__).resolve().parent / 'results'


def timed(fn, *args, **kwargs):
  """Runs fn, blocks on its output, returns (output, seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - start


def machine() -> dict:
  dev = jax.devices()[0]
  return {'platform': dev.platform, 'device': dev.device_kind, 'devices': jax.device_count(),
          'cpus': os.cpu_count(), 'python': platform.python_version(), 'jax': jax.__version__}


def write_results(name: str, results: dict, table_rows: list[tuple], header: tuple,
                  notes: str = '', quick: bool = False) -> Path:
  """Writes bench/results/<name>.json (top-level keys = headline figures) and <name>.md."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  stem = name + ('_quick' if quick else '')
  results = {**results, 'quick': quick, 'machine': machine()}
  path = RESULTS / f'{stem}.json'
  atomic.write_text(path, json.dumps(results, indent=2) + '\n')
  lines = [f'# {name}' + (' (quick)' if quick else ''), '', notes.strip(), '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in table_rows]
  lines += ['', f"Machine: {results['machine']}", '']
  md = RESULTS / f'{stem}.md'
  atomic.write_text(md, '\n'.join(lines))
  return path
