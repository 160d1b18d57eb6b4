"""Compile time of the masked supernet with its layers scanned (`model.scan_layers`, the default)
vs unrolled, both sides in one run, and whether the two compute the same thing.

Programs, per config:
- `population_forward`: the logits of 4 sampled sub-networks, vmapped (what search and proxies
  compile), on this CPU;
- `arch_gradient`: the gradient of one sub-network's summed logits w.r.t. all parameters, on this
  CPU;
- `train_step_v5e_4x4` (full mode, `tpu` extra): the trainer's sandwich step of the GPT-2-medium
  supernet compiled by libtpu for v5e:4x4 on this CPU (`elastic-jax compile` with `flops='none'`).

Usage: python bench/bench_compile.py [--quick]   (quick: the quickstart tiny config only)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import load_config  # noqa: E402

from elastic_jax.workdir import build_space, init_supernet  # noqa: E402


def cpu_programs(name: str, arg: str | None) -> list[dict]:
  cfg = load_config(name, arg)
  space = build_space(cfg)
  model = init_supernet(cfg, space)
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 16)), jnp.int32)
  archs = space.sample(jax.random.key(0), 4)
  rows, outputs = [], {}
  for scan in (True, False):
    model_cfg = dataclasses.replace(model.cfg, scan_layers=scan)

    def merged(s, model_cfg=model_cfg):
      m = nnx.merge(graphdef, s)
      m.cfg = model_cfg
      return m

    def forward(s, a):
      m = merged(s)
      return jax.vmap(lambda x: m({'tokens': tokens}, x))(a)

    def gradient(s, a):
      one = jax.tree.map(lambda x: x[0], a)
      return jax.grad(lambda p: merged(p)({'tokens': tokens}, one).sum())(s)

    for program, fn in (('population_forward', forward), ('arch_gradient', gradient)):
      t = time.perf_counter()
      compiled = jax.jit(fn).lower(state, archs).compile()
      seconds = time.perf_counter() - t
      outputs[program, scan] = jax.tree.leaves(compiled(state, archs))
      rows.append({'config': f'{name}:{arg}' if arg else name, 'program': program,
                   'layers': space.num_layers, 'scan_layers': scan,
                   'compile_seconds': round(seconds, 2)})
  for row in rows:
    a, b = outputs[row['program'], True], outputs[row['program'], False]
    row['max_abs_diff_scan_vs_unrolled'] = max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b))
  return rows


def tpu_train_step(name: str) -> list[dict]:
  from elastic_jax import aot
  rows = []
  for scan in (True, False):
    cfg = copy.deepcopy(load_config(name))
    with cfg.unlocked():
      cfg.model.scan_layers = scan
    t = time.perf_counter()
    report = aot.compile_report(cfg, 'v5e:4x4', programs=('train_step',), flops='none')
    step = report['programs']['train_step']
    rows.append({'config': name, 'program': 'train_step_v5e_4x4',
                 'layers': int(cfg.space.num_layers), 'scan_layers': scan,
                 'compile_seconds': round(step['compile_seconds'], 1),
                 'wall_seconds': round(time.perf_counter() - t, 1),
                 'hbm_gib_per_device': round(step['memory_bytes']['total'] / 2**30, 2),
                 'fits': step['fits']})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args()
  rows = cpu_programs('quickstart', 'tiny')
  if not args.quick:
    rows += cpu_programs('bert_elm', None)
    rows += tpu_train_step('gpt2_medium_supernet')

  def pick(config_prefix, program):
    by = {r['scan_layers']: r['compile_seconds'] for r in rows
          if r['config'].startswith(config_prefix) and r['program'] == program}
    return by or None

  results = {
      'bert_elm_population_forward_seconds': pick('bert_elm', 'population_forward'),
      'bert_elm_arch_gradient_seconds': pick('bert_elm', 'arch_gradient'),
      'gpt2_medium_train_step_v5e_4x4_seconds': pick('gpt2_medium', 'train_step_v5e_4x4'),
      'max_abs_diff_scan_vs_unrolled': max(r.get('max_abs_diff_scan_vs_unrolled', 0.0)
                                           for r in rows),
      'rows': rows,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  header = ('config', 'program', 'scan_layers', 'compile s', 'max |scan - unrolled|', 'HBM GiB')
  table = [(r['config'], r['program'], r['scan_layers'], r['compile_seconds'],
            r.get('max_abs_diff_scan_vs_unrolled', ''), r.get('hbm_gib_per_device', ''))
           for r in rows]
  notes = ('Compile seconds (lowering + XLA compile) of the same programs with the masked '
           "supernet's layers scanned vs unrolled, in one run; CPU programs on batch 2 x 16 "
           'tokens, 4 archs; the TPU step compiled by libtpu on this CPU. The machine may have '
           'been shared with other jobs: compare the two columns of one run. XLA_FLAGS: '
           f"{results['xla_flags'] or '(none)'}.")
  path = common.write_results('bench_compile', results, table, header, notes, quick=args.quick)
  print(path.with_suffix('.md').read_text())


if __name__ == '__main__':
  main()
