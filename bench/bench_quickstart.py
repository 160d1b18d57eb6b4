"""The README's main job, timed from a fresh clone: what a newcomer waits for.

Clones this repository (its HEAD) into a temporary folder and runs the README's first command
there, step by step as written (`python3 -m venv .venv`, `pip install -e .`, `elastic-jax run
--config=configs/quickstart.py --workdir=...`), with a fresh data cache, so the corpus and the BPE
are built as on a new machine (pip's own download cache is kept: the registry is not what we
measure). Records the time of each step and the time per phase that `run` prints (train, search,
export), and the front it found.

  python bench/bench_quickstart.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _first_command() -> str:
  text = (REPO / 'README.md').read_text()
  block = re.search(r'^```bash\n(.*?)^```', text, re.M | re.S).group(1)
  return block.strip()


def _timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return seconds, proc.stdout + proc.stderr


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='train 20 steps and search 2 generations (checks the script)')
  args = parser.parse_args()
  import os
  command = _first_command()
  steps = [s.strip() for s in command.split('&&')]
  assert steps[0] == 'python3 -m venv .venv' and 'pip install -e .' in steps[1], steps
  assert 'elastic-jax run' in steps[2], steps
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    clone = tmp / 'clone'
    subprocess.run(['git', 'clone', '-q', str(REPO), str(clone)], check=True)
    env = {**os.environ, 'ELASTIC_JAX_CACHE': str(tmp / 'cache'), 'JAX_PLATFORMS': 'cpu'}
    workdir = tmp / 'elastic_quickstart'
    venv_s, _ = _timed(['python3', '-m', 'venv', '.venv'], clone, env)
    install_s, _ = _timed(['.venv/bin/pip', 'install', '-q', '-e', '.'], clone, env)
    run_argv = steps[2].split()
    run_argv = [a if not a.startswith('--workdir=') else f'--workdir={workdir}' for a in run_argv]
    if args.quick:
      run_argv += ['--config.train.steps=20', '--config.search.generations=2']
    run_s, output = _timed(run_argv, clone, env)
    phases = {k: float(v) for k, v in re.findall(r'(\w+) ([\d.]+) s', output.split(
        'time per phase:')[-1].splitlines()[0])} if 'time per phase:' in output else {}
    pareto = json.loads((workdir / 'search' / 'pareto.json').read_text())
  losses = [m['objectives']['loss'] for m in pareto['front']]
  params = [m['objectives']['params'] for m in pareto['front']]
  results = {
      'total_s': venv_s + install_s + run_s,
      'install_s': venv_s + install_s,
      'run_s': run_s,
      'phases_s': {k: v for k, v in phases.items() if k != 'total'},
      'front_loss_min': min(losses), 'front_loss_max': max(losses),
      'front_params_min': min(params), 'front_params_max': max(params),
      'front_size': len(losses),
      'readme_command': command,
  }
  rows = [('venv + pip install -e .', f'{venv_s + install_s:.1f}')]
  rows += [(f'run: {k}', f'{v:.1f}') for k, v in results['phases_s'].items()]
  rows += [('total', f"{results['total_s']:.1f}")]
  notes = (f'The README\'s first command from a fresh clone (HEAD), fresh data cache, on this '
           f'machine. Front: {len(losses)} members, loss {min(losses):.3f}-{max(losses):.3f} '
           f'nats/token, {min(params):,}-{max(params):,} parameters.')
  path = common.write_results('bench_quickstart', results, rows, ('step', 'seconds'), notes,
                              quick=args.quick)
  print(json.dumps(results, indent=2), f'\nwrote {path}')


if __name__ == '__main__':
  main()
