"""Start-up cost of the small commands on the ELM space (issue 15's target: each under 2 minutes
and 4 GB on this CPU): wall seconds and peak resident memory of each command, run one at a time
as its own process, exactly as a user types it.

Cases (`configs/bert_elm.py`: 12 layers, both block types per layer, 3 minibatches of 32 x 128
tokens for the proxies):
- `proxy_all`: `elastic-jax proxy --n=3`, every zero-cost proxy (the gradient proxies
  differentiate each minibatch `proxy.backward_batch` = 8 sequences at a time, the default);
- `proxy_all_one_pass`: the same with `proxy.backward_batch=0` (the whole minibatch per backward
  pass: what the command did before that field existed);
- `proxy_wpca`: W-PCA only (what training-free search computes);
- `evaluate_largest`: `elastic-jax evaluate --arch=largest` (the masked model's loss);
- `*_warm`: the same command again, its compiled programs in the persistent compilation cache
  the first run filled (what a user's second call costs). Every other case starts with an empty
  cache of its own (JAX_COMPILATION_CACHE_DIR), so it compiles everything.

Usage: python bench/bench_commands.py [--quick]   (quick: `configs/bert_elm.py:runlocal`)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Runs the command given as arguments and prints the peak RSS of its process tree (Linux: KiB).
_PEAK = ('import resource, subprocess, sys\n'
         'rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n'
         'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if rc == 0 else -rc)')
TARGET = {'seconds': 120.0, 'peak_gb': 4.0}


def cases(config: str) -> dict[str, tuple[list[str], str]]:
  """name -> (command, the case whose compilation cache it uses)."""
  cli = [sys.executable, '-m', 'elastic_jax.cli']
  proxy = [*cli, 'proxy', f'--config={config}', '--n=3']
  evaluate = [*cli, 'evaluate', f'--config={config}', '--arch=largest']
  return {
      'proxy_all': (proxy, 'proxy_all'),
      'proxy_all_warm': (proxy, 'proxy_all'),
      'proxy_all_one_pass': ([*proxy, '--config.proxy.backward_batch=0'], 'proxy_all_one_pass'),
      'proxy_wpca': ([*proxy, "--config.proxy.names=('wpca',)"], 'proxy_wpca'),
      'evaluate_largest': (evaluate, 'evaluate_largest'),
      'evaluate_largest_warm': (evaluate, 'evaluate_largest'),
  }


def run(command: list[str], cache_dir: Path) -> tuple[float, float]:
  """(wall seconds, peak resident GB) of one command with its compilation cache in `cache_dir`;
  raises if it fails."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir))
  start = time.perf_counter()
  out = subprocess.run([sys.executable, '-c', _PEAK, *command], capture_output=True, text=True,
                       cwd=common.REPO, check=True, env=env)
  seconds = time.perf_counter() - start
  kib = int(out.stdout.strip().splitlines()[-1])
  if kib < 0:
    raise RuntimeError(f'{command} exited with status {-kib}: {out.stderr[-2000:]}')
  return seconds, kib * 1024 / 1e9


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args()
  config = 'configs/bert_elm.py' + (':runlocal' if args.quick else '')
  seconds, peak_gb, rows = {}, {}, []
  caches = Path(tempfile.mkdtemp(prefix='bench-commands-xla-'))
  for name, (command, cache) in cases(config).items():
    seconds[name], peak_gb[name] = (round(v, 2) for v in run(command, caches / cache))
    ok = seconds[name] <= TARGET['seconds'] and peak_gb[name] <= TARGET['peak_gb']
    rows.append((name, f'`{" ".join(command[3:])}`', seconds[name], peak_gb[name],
                 'yes' if ok else 'no'))
    print(json.dumps({'case': name, 'seconds': seconds[name], 'peak_gb': peak_gb[name]}),
          flush=True)
  notes = (f'Wall seconds and peak resident memory (the process tree\'s maximum RSS) of each '
           f'command on {config}, run one after another on an otherwise idle machine, each in '
           f'a fresh process (imports, data, supernet initialisation, compile and run) with an '
           f'empty compilation cache; *_warm: run again, its programs in the cache the first run '
           f'filled. Target (issue 15): under {TARGET["seconds"]:.0f} s and '
           f'{TARGET["peak_gb"]:.0f} GB.')
  common.write_results('bench_commands', {'seconds': seconds, 'peak_gb': peak_gb,
                                          'target': TARGET, 'config': config},
                       rows, ('case', 'command', 'seconds', 'peak GB', 'within target'),
                       notes=notes, quick=args.quick)
  shutil.rmtree(caches, ignore_errors=True)


if __name__ == '__main__':
  main()
