"""W-PCA, the search's zero-cost proxy: what one PCA count costs, and what its population program
costs per device on a TPU slice.

1. Per count, on this CPU (XLA single-threaded, as bench_nasbench_bert times the proxies):
   `proxies.pca.linear_count` for N tokens of FFN input width D through an FFN kernel of width F,
   the two ways it can run:
   - scatter: the eigendecomposition of the input's scatter matrix S = R^T R, then the
     eigenvalues of the D x D matrix R K K^T R^T (two eigendecompositions);
   - kernel: the Cholesky factor L of K K^T and the eigenvalues of L^T S L (one; the search's
     per-width counts use it, 889c8e4), falling back at run time when K K^T is singular;
   and, for scale, the count of the pre-activations formed (x @ K, then their F x F scatter
   matrix: what a W-PCA implementation that records the activations does, as W-PCA's authors').
   Every count (eta 0.9, 0.99, 0.999) is checked against an independent float64 NumPy reference:
   the eigenvalues of the pre-activations' covariance (`numpy.linalg.eigvalsh`), counted as the
   paper counts (the smallest k whose cumulative explained variance exceeds eta). A kernel with
   zero columns (a masked FFN wider than D, K K^T singular) checks the fallback.
2. On a TPU slice, compiled here (`elastic_jax.aot.compile_report`, libtpu; skipped without the
   `tpu` extra): the search's population program with the W-PCA objective for BERT-base ELM
   (configs/bert_base_elm.py, v5e:4x4, 2 unrolled layers, as `elastic-jax compile` builds it):
   that it compiles and fits, its buffer assignment, and XLA's counts per device. XLA counts a
   loop body once whatever its trip count, so the layer split of part 3 (the layers' counts are a
   loop) does not show in them.

3. Layers over devices, on 8 fake CPU devices (one process, XLA's devices sharing this CPU's
   cores, so the wall time is the total work): one masked arch's per-width W-PCA counts of 12
   BERT-base-sized FFN layers (8,192 tokens, D 768, F 768-3,072), as the search computes them
   (`features._counts_by_layer`: each device the factorisations and eigendecompositions of its
   own layers, `shard_map` over the layer axis) and as it computed them before (`lax.map` over
   every layer on every device, the products split over the FFN axis); the counts must agree.

Writes bench/results/bench_wpca.json (top-level keys: `kernel_over_scatter_speedup` at the
largest size, `counts_agree`, `aot`, `layer_split` with its `speedup`) and
bench_wpca.md.

  python bench/bench_wpca.py [--quick]    # full: ~10 min on a 2-core CPU; --quick: ~1 min, no AOT
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from unittest import mock

os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false')
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import load_config, write_results  # noqa: E402

from elastic_jax.proxies import pca  # noqa: E402

ETAS = (0.9, 0.99, 0.999)
# (tokens N, FFN input width D, FFN width F): BERT-small and BERT-base FFN shapes.
SIZES = ((8192, 256, 1024), (8192, 384, 1536), (8192, 768, 1536), (8192, 768, 3072))
QUICK_SIZES = ((2048, 64, 256), (2048, 192, 768))


def reference_count(h_NxF: np.ndarray, eta: float) -> int:
  """The paper's count in float64: smallest k with sum(lambda_1..k) / sum(lambda) > eta."""
  h = h_NxF - h_NxF.mean(axis=0)
  ev = np.linalg.eigvalsh(h.T @ h)[::-1]
  ev = np.where(ev > max(h.shape) * np.finfo(np.float32).eps * ev[0], ev, 0.0)
  ratio = np.cumsum(ev) / ev.sum()
  return int(min(np.sum(ratio <= eta) + 1, np.sum(ev > 0)))


def best_seconds(fn, repeats: int) -> float:
  fn().block_until_ready()  # compiled and warm
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn().block_until_ready()
    times.append(time.perf_counter() - start)
  return min(times)


def inputs(n: int, d: int, f: int, zero_columns: int, seed: int = 0):
  """Tokens with a decaying spectrum (so the counts fall between 1 and D) and a kernel; the
  last `zero_columns` kernel columns zeroed (a masked FFN)."""
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(n, d)) * 0.99 ** np.arange(d)).astype(np.float32)
  k = (rng.normal(size=(d, f)) * 0.05).astype(np.float32)
  if zero_columns:
    k[:, f - zero_columns:] = 0.0
  return x, k


def per_count(n: int, d: int, f: int, zero_columns: int, repeats: int) -> dict:
  x, k = inputs(n, d, f, zero_columns)
  h64 = x.astype(np.float64) @ k.astype(np.float64)
  expected = [reference_count(h64, eta) for eta in ETAS]
  scatter, n_valid = jax.jit(pca.input_scatter)(jnp.asarray(x))
  kernel = jnp.asarray(k)
  row = {'tokens': n, 'd': d, 'f': f, 'zero_columns': zero_columns, 'reference': expected}
  ways = {
      'scatter': jax.jit(functools.partial(pca.linear_count, factor_kernel=False),
                         static_argnums=3),
      'kernel': jax.jit(functools.partial(pca.linear_count, factor_kernel=True),
                        static_argnums=3)}
  for name, fn in ways.items():
    row[f'{name}_counts'] = [int(fn(scatter, n_valid, kernel, eta)) for eta in ETAS]
    row[f'{name}_ms'] = 1e3 * best_seconds(lambda fn=fn: fn(scatter, n_valid, kernel, 0.99),
                                           repeats)
  formed = jax.jit(lambda x, k, eta: pca.pca_count(x @ k, eta), static_argnums=2)
  xj = jnp.asarray(x)
  row['formed_counts'] = [int(formed(xj, kernel, eta)) for eta in ETAS]
  # The formed way includes the scatter matrix of x @ K (the others get S precomputed, as the
  # search shares it between the widths of a layer); its input product is timed with it.
  row['formed_ms'] = 1e3 * best_seconds(lambda: formed(xj, kernel, 0.99), max(repeats // 3, 1))
  row['agree'] = all(row[f'{w}_counts'] == expected for w in ('scatter', 'kernel', 'formed'))
  row['kernel_over_scatter_speedup'] = row['scatter_ms'] / row['kernel_ms']
  print(f'N={n} D={d} F={f} zero cols {zero_columns}: scatter {row["scatter_ms"]:.1f} ms, '
        f'kernel {row["kernel_ms"]:.1f} ms ({row["kernel_over_scatter_speedup"]:.2f}x), '
        f'formed {row["formed_ms"]:.1f} ms; counts {row["kernel_counts"]} vs reference '
        f'{expected}', flush=True)
  return row


def population_on_tpu(topology: str = 'v5e:4x4', layers: int = 2) -> dict:
  """The search's W-PCA population program of BERT-base ELM on `topology`, compiled here."""
  from elastic_jax import aot

  cfg = load_config('bert_base_elm', 'v5e-16')
  with cfg.unlocked():
    cfg.search.objectives = ('wpca', 'params')
    cfg.space.num_layers = layers
    cfg.space.depth = (layers,)
    cfg.model.scan_layers = False
  costs = []
  real_cost = aot._cost

  def recorded(compiled):
    costs.append(real_cost(compiled))
    return costs[-1]

  start = time.perf_counter()
  with mock.patch.object(aot, '_cost', recorded):
    report = aot.compile_report(cfg, topology, programs=('population_eval',))
  p = report['programs']['population_eval']
  gib = 2 ** 30
  out = {'topology': topology, 'layers': layers, 'population': p['population'],
         'flops_per_device_loop_bodies_once': costs[0]['flops'],
         'bytes_accessed_per_device_loop_bodies_once': costs[0]['bytes_accessed'],
         'memory_gib': p['memory_bytes']['total'] / gib,
         'temporaries_gib': p['memory_bytes']['temporaries'] / gib,
         'fits': p['fits'], 'compile_seconds': time.perf_counter() - start}
  print(f'TPU: {out["flops_per_device_loop_bodies_once"] / 1e9:.1f} GFLOP, '
        f'{out["bytes_accessed_per_device_loop_bodies_once"] / 1e9:.2f} GB accessed, '
        f'{out["memory_gib"]:.2f} GiB per device, fits: {out["fits"]}', flush=True)
  return out


LAYER_SPLIT_SCRIPT = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from elastic_jax import parallel
from elastic_jax.proxies import features
layers, n, d, repeats = (int(a) for a in sys.argv[1:5])
widths = ((d,), (d, 2 * d, 4 * d))
rng = np.random.default_rng(0)
x = (rng.normal(size=(layers, n, d)) * 0.99 ** np.arange(d)).astype(np.float32)
k = (rng.normal(size=(layers, d, 4 * d)) * 0.05).astype(np.float32)
fields = {'on': np.ones(layers, bool), 'ffn_in': np.full(layers, d),
          'ffn': rng.choice(widths[1], layers)}
valid = np.ones(n, np.float32)

def split(x, k, valid, fields):  # the search's way
  return features._counts_by_layer(x, valid, k, fields, 0.99, widths)

def replicated(x, k, valid, fields):  # before: every device every layer
  scatter, n_valid = jax.vmap(lambda a: features.input_scatter(a, valid))(x)
  return jax.lax.map(lambda a: features._count_by_width(a[0], n_valid[0], a[1], 0.99, a[2],
                                                        widths), (scatter, k, fields))

mesh = parallel.make_mesh({'data': 1, 'fsdp': jax.device_count(), 'tensor': 1})
rows = NamedSharding(mesh, PartitionSpec(None, 'fsdp'))  # tokens over the devices, as a batch
rep = NamedSharding(mesh, PartitionSpec())
args = (jax.device_put(x, rows), jax.device_put(k, rep), jax.device_put(valid, NamedSharding(
    mesh, PartitionSpec('fsdp'))), jax.device_put(fields, rep))
out = {'devices': jax.device_count(), 'layers': layers, 'tokens': n, 'd': d,
       'ffn': fields['ffn'].tolist()}
for name, fn in (('split', split), ('replicated', replicated)):
  run = jax.jit(parallel.on_mesh(fn, mesh))
  start = time.perf_counter()
  counts = np.asarray(run(*args))
  out[name + '_first_s'] = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run(*args).block_until_ready()
    times.append(time.perf_counter() - start)
  out[name + '_s'], out[name + '_counts'] = min(times), counts.tolist()
print(json.dumps(out))
"""


def layer_split(quick: bool) -> dict:
  """Part 3, in a subprocess with 8 fake CPU devices (the device count is fixed at start-up)."""
  import subprocess
  import sys
  size = ('4', '512', '64', '2') if quick else ('12', '8192', '768', '3')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': (
      os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()}
  out = subprocess.run([sys.executable, '-c', LAYER_SPLIT_SCRIPT, *size], env=env, text=True,
                       capture_output=True, check=False)
  if out.returncode:
    raise SystemExit(f'the fake-device run failed:\n{out.stderr[-3000:]}')
  got = json.loads(out.stdout.splitlines()[-1])
  got['agree'] = got['split_counts'] == got['replicated_counts']
  got['speedup'] = got['replicated_s'] / got['split_s']
  print(f'8 fake devices, {got["layers"]} layers: split {got["split_s"]:.2f} s, replicated '
        f'{got["replicated_s"]:.2f} s ({got["speedup"]:.2f}x); counts agree: {got["agree"]}',
        flush=True)
  return got


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='small sizes, no TPU compile')
  args = parser.parse_args()
  sizes = QUICK_SIZES if args.quick else SIZES
  repeats = 3 if args.quick else 7
  rows = [per_count(n, d, f, 0, repeats) for n, d, f in sizes]
  n, d, f = sizes[-1]
  rows.append(per_count(n, d, f, f - d // 2, repeats))  # K K^T singular: the fallback
  aot = {}
  if not args.quick:
    try:
      import libtpu  # noqa: F401
    except ImportError:
      print('libtpu not installed (the tpu extra): the TPU compile is skipped')
    else:
      aot = population_on_tpu()
  split = layer_split(args.quick)
  largest = rows[-2]
  results = {'kernel_over_scatter_speedup': largest['kernel_over_scatter_speedup'],
             'largest': {k: largest[k] for k in ('tokens', 'd', 'f')},
             'counts_agree': all(r['agree'] for r in rows) and split['agree'], 'aot': aot,
             'layer_split': split, 'per_count': rows,
             'etas': ETAS, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
             'openblas_num_threads': os.environ.get('OPENBLAS_NUM_THREADS', '')}
  table = [(r['tokens'], r['d'], r['f'], r['zero_columns'], f'{r["scatter_ms"]:.1f}',
            f'{r["kernel_ms"]:.1f}', f'{r["kernel_over_scatter_speedup"]:.2f}',
            f'{r["formed_ms"]:.0f}', '/'.join(map(str, r['reference'])),
            'yes' if r['agree'] else 'NO') for r in rows]
  notes = [
      f'One W-PCA count (`proxies.pca.linear_count`) on this CPU, XLA single-threaded, best of '
      f'{repeats}, eta 0.99 timed: scatter = two eigendecompositions (S, then R K K^T R^T), '
      'kernel = Cholesky of K K^T and one eigendecomposition of L^T S L (the search\'s way; '
      'with zero kernel columns K K^T is singular and it falls back to the scatter way at run '
      'time), formed = x @ K and the F x F scatter matrix of the pre-activations. Counts at eta '
      f'{"/".join(map(str, ETAS))} checked against float64 NumPy on the formed pre-activations '
      f'(all agree: {results["counts_agree"]}).']
  ffn = '/'.join(map(str, sorted(set(split['ffn']))))
  notes.append(
      f'\nLayers over devices: one arch\'s per-width counts of {split["layers"]} FFN layers '
      f'({split["tokens"]} tokens, D {split["d"]}, F {ffn})'
      f' on {split["devices"]} fake CPU devices sharing this CPU (wall time = total work): each '
      f'device its own layers (`features._counts_by_layer`) {split["split_s"]:.2f} s, every device '
      f'every layer (before) {split["replicated_s"]:.2f} s: {split["speedup"]:.2f}x; counts '
      f'agree: {split["agree"]}.')
  if aot:
    notes.append(
        f'\nThe search\'s W-PCA population program, BERT-base ELM ({aot["layers"]} unrolled '
        f'layers, population {aot["population"]}), compiled for {aot["topology"]} by libtpu '
        f'here: {aot["memory_gib"]:.2f} GiB per device (fits: {aot["fits"]}); XLA\'s counts per '
        f'device, loop bodies once: {aot["flops_per_device_loop_bodies_once"] / 1e9:.1f} GFLOP, '
        f'{aot["bytes_accessed_per_device_loop_bodies_once"] / 1e9:.2f} GB accessed.')
  header = ('tokens', 'D', 'F', 'zero kernel columns', 'scatter ms', 'kernel ms',
            'kernel speed-up', 'formed ms', 'reference counts', 'all agree')
  write_results('bench_wpca', results, table, header, '\n'.join(notes), quick=args.quick)


if __name__ == '__main__':
  main()
