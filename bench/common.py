"""Shared plumbing of the bench scripts: timing, result files (JSON + markdown table) that say
where they come from (git commit, uncommitted changes, machine, command line)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jax

from elastic_jax import atomic, notebook

RESULTS = Path(__file__).resolve().parent / 'results'
REPO = RESULTS.parents[1]


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py[:arg] as `--config` loads it (`elastic_jax.notebook.load_config`; not
  the tests' helper, whose import would set the test run's XLA flags and compilation cache)."""
  return notebook.load_config(f'configs/{name}.py' + (f':{arg}' if arg else ''), REPO)


def timed(fn, *args, **kwargs):
  """Runs fn, blocks on its output, returns (output, seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - start


def host_cpu() -> dict:
  """The host CPU's model name and widest vector extension XLA's CPU kernels can use (Linux;
  empty elsewhere). Hosts that all record '2 cpus' differ: bench_peers' 64-arch population
  (masked, and the dense exports) ran 3-4x slower steady on an AVX2-only AMD EPYC than in its
  committed results, so a timing is read with the CPU it ran on."""
  try:
    text = Path('/proc/cpuinfo').read_text()
  except OSError:
    return {}
  fields = dict(line.split(':', 1) for line in text.splitlines() if ':' in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  flags = set((fields.get('flags') or fields.get('Features', '')).split())  # x86 / Arm
  simd = next((f for f in ('avx512f', 'avx2', 'avx', 'sse4_2', 'asimd') if f in flags), None)
  return {'cpu_model': fields.get('model name'), 'simd': simd}


def machine() -> dict:
  dev = jax.devices()[0]
  return {'platform': dev.platform, 'device': dev.device_kind, 'devices': jax.device_count(),
          'cpus': os.cpu_count(), **host_cpu(), 'python': platform.python_version(),
          'jax': jax.__version__}


def provenance() -> dict:
  """The commit the bench ran on, whether the work tree differed from it (`dirty`; untracked
  files count, bench/results/ does not: a bench that writes its results after every case would
  otherwise mark its own later cases dirty), and the command line. None where git cannot tell
  (not a clone)."""
  def git(*args) -> str | None:
    try:
      out = subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except OSError:
      return None
    return out.stdout.strip() if out.returncode == 0 else None

  commit = git('rev-parse', 'HEAD')
  status = git('status', '--porcelain', '--', '.', ':!bench/results') if commit else None
  return {'commit': commit, 'dirty': None if status is None else bool(status),
          'command': shlex.join(['python', *sys.argv])}


def write_results(name: str, results: dict, table_rows: list[tuple], header: tuple,
                  notes: str = '', quick: bool = False) -> Path:
  """Writes bench/results/<name>.json (top-level keys = headline figures) and <name>.md."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  stem = name + ('_quick' if quick else '')
  results = {**results, 'quick': quick, 'machine': machine(), **provenance()}
  path = RESULTS / f'{stem}.json'
  atomic.write_text(path, json.dumps(results, indent=2) + '\n')
  lines = [f'# {name}' + (' (quick)' if quick else ''), '', notes.strip(), '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in table_rows]
  dirty = ' (with uncommitted changes)' if results['dirty'] else ''
  lines += ['', f"Machine: {results['machine']}", '',
            f"Commit {results['commit']}{dirty}; command: `{results['command']}`", '']
  md = RESULTS / f'{stem}.md'
  atomic.write_text(md, '\n'.join(lines))
  return path


def in_workers(fn, calls: dict, jobs: int, log=print) -> dict:
  """{name: fn(*args)} for `calls` = {name: args}, run in `jobs` worker processes (spawned: JAX
  does not survive a fork), in the order given; each result is logged as it arrives. On a 2-core
  CPU two single-threaded runs train faster than one run on both cores."""
  import multiprocessing  # noqa: PLC0415
  from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: PLC0415
  done = {}
  with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context('spawn')) as pool:
    futures = {pool.submit(fn, *args): name for name, args in calls.items()}
    for future in as_completed(futures):
      name = futures[future]
      done[name] = future.result()
      log(f'{name}: {done[name]}')
  return {name: done[name] for name in calls}
