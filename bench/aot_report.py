"""Ahead-of-time compile report of the large configs for TPU slices (no TPU needed).

For each (config, topology) pair, `elastic_jax.aot.compile_report` (what `elastic-jax compile`
runs) compiles the training step and the population evaluation with the TPU compiler (libtpu) on
this CPU and records memory per device against the chip's HBM, XLA's FLOPs and estimated time, and
the MFU estimate. Writes bench/results/aot.json (top-level keys: '<config>:<arg>@<topology>' ->
memory per chip and MFU of each program; the full reports under 'reports') and aot.md.

  pip install -e '.[tpu]'
  python bench/aot_report.py [--quick] [--only gpt2_medium_supernet] [--resume]

--quick compiles the training step only and counts no FLOPs (memory only). Results are written
after every case (each case records the commit it was compiled at); --resume keeps the cases
already in the JSON file and compiles the others.
--programs p1,p2 (re)compiles only those programs of the selected cases and, with --resume,
puts them in place of the same programs of the cases already written, keeping the others (each
program records the commit it was compiled at; e.g. after a change to the search's program:
--resume --programs population_eval).
--only selects cases by a substring of their key, config:arg@topology. A GPT-2-medium case holds
about 15 GB of host memory while it compiles; on a small machine run one case per process:
  for c in bert_base_elm:v5e bert_base_elm:v5p gpt2_medium_supernet:v5e \
      gpt2_medium_supernet:v5p; do python bench/aot_report.py --resume --only=$c; done
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from common import RESULTS, load_config, provenance, write_results  # noqa: E402

from elastic_jax import aot  # noqa: E402

CASES = [  # (config file, argument, topology), cheapest compiles first
    ('bert_base_elm', 'v5e-16', 'v5e:4x4'),
    ('bert_base_elm', 'v5p-8', 'v5p:2x2x2'),
    ('gpt2_medium_supernet', 'v5e-16', 'v5e:4x4'),
    ('gpt2_medium_supernet', 'v5p-8', 'v5p:2x2x2'),
]
GIB = 1024 ** 3
HEADER = ('config', 'topology', 'program', 'max params', 'mesh d x f x t', 'batch x seq (accum)',
          'args GiB', 'temps GiB', 'total / HBM GiB', 'fits', 'XLA TFLOP / device', 'est. ms',
          'MFU est.', 'masked / dense', 'compile s')
NOTES = """
Compiled on a CPU-only machine by the TPU compiler (libtpu) for the named slice with the config's
own mesh (`elastic-jax compile`, elastic_jax/aot.py). Programs: train_step, the trainer's own
sandwich step (`trainer.build_step`: same shardings, donation, strided micro-batches, scanned and
rematerialised layers, FSDP-sharded parameters gathered once per micro-batch; the largest and
smallest sub-networks as dense slices of the supernet, `train.dense_static_archs`, the two random
ones masked; BERT-base ELM's slices give their block outputs to the distillation laid out as the
masked supernet's); dense_step, the reference: the largest sub-network's dense export trained by a
plain cross-entropy step with the same batch, micro-batches, optimizer and shardings (what a
non-elastic trainer would run); population_eval, the search's own loop (the supernet gathered over
FSDP once per call, `parallel.gathered`, since 9ccda41; before, XLA had every device compute every
row's logits: GPT-2 medium on v5e:4x4 70.8 s per generation of 50, MFU 5%, now 7.9 s, 43%). Memory:
XLA's buffer assignment per device (arguments = sharded params + Adam state + batch; the donated
state is aliased to the outputs; total = arguments + outputs - aliased + temporaries + code). XLA
TFLOP: XLA's cost analysis of the compiled program, whose loop bodies XLA counts once, times the
loop trip counts (train: x grad_accum, counted on a twin with the layers and the K = 4 sandwich
sub-networks unrolled, each layer rematerialised as `model.remat` says, so the recomputation is
counted, as in the dense step, which has the same remat: since 62c2c0a, before which no
recomputation was counted; dense: x grad_accum; evaluation: x population x batches). est. ms: the
roofline max(XLA FLOPs / peak, XLA bytes accessed / HBM bandwidth), scaled the same way (no
collective latency, no host work); every program here is byte-bound in it. XLA's count of bytes
is a model, not a profile, so est. ms and MFU are estimates; a profile on a TPU is the check.
MFU est.: the analytic model FLOPs (cost.py: 3 x forward FLOPs per token for training; for the
masked step the sampled sub-networks', sandwich = largest + smallest + 2 random, averaged over 8
steps; for the dense step the largest sub-network's; for masked LM the vocabulary projection
counted at the predicted share of positions, data.mlm_probability, since 015e804) over (chips x
bf16 peak x est. time); the masked supernet computes its sub-networks at the supernet's widths,
so the hardware's FLOP utilisation is higher than its MFU. XLA's cost analysis counts a
conditional as its costliest
branch, so the layers (`lax.switch`), FFN column blocks and head blocks (`lax.cond`) that a
masked sub-network skips at run time are counted as run: for the masked sub-networks the
estimate is an upper bound (both TPU configs mask inactive heads and FFN units instead of
skipping them, model.skip_width_blocks off: only the layer switch is left). masked / dense:
the masked step's estimated time per model FLOP over the dense reference's (1 = elasticity
costs nothing). Attention: the configs' `model.attention`
('splash' in both TPU configs since b08287f; every case here is compiled with it): the Pallas
kernel is opaque to XLA's cost analysis, so its FLOPs are missing from XLA TFLOP and its bytes
are its operands and results. Where the bytes
go, one mechanism at a time: bench/results/aot_ablation.md. compile s: lowering + compiling on a
2-core CPU that other jobs may have shared. The commit each case was compiled at: aot.json,
reports.<case>.commit, and each program's, reports.<case>.programs.<program>.commit (a program
recompiled later, `--programs`, has its own).
"""


def row(case: str, report: dict, name: str) -> tuple:
  p = report['programs'][name]
  m = p['memory_bytes']
  est = p.get('estimated_seconds')
  batch, seq = report['batch']
  return (case, report['topology'], name,
          f"{report['params_max'] / 1e6:.0f}M", '{data}x{fsdp}x{tensor}'.format(**report['mesh']),
          f"{batch} x {seq} ({report['grad_accum']})",
          f"{m['arguments'] / GIB:.2f}", f"{m['temporaries'] / GIB:.2f}",
          f"{m['total'] / GIB:.2f} / {p['hbm_bytes_per_device'] / GIB:.0f}",
          'yes' if p['fits'] else '**no**',
          f"{p['xla_flops_per_device'] / 1e12:.1f}" if p.get('xla_flops_per_device') else '-',
          f'{est * 1e3:.0f}' if est else '-',
          f"{p['mfu_estimate']:.0%}" if p.get('mfu_estimate') else '-',
          f"{report['masked_over_dense']:.2f}x" if name == 'train_step' and report.get(
              'masked_over_dense') else '-',
          f"{p['compile_seconds']:.0f}" if p.get('compile_seconds') else '-')


def headline(report: dict) -> dict:
  """Memory per chip and MFU of each program of one case (the JSON's top-level figures)."""
  out = {'fits': report['fits'], 'masked_over_dense': report.get('masked_over_dense')}
  for name, p in report['programs'].items():
    out[name] = {'memory_per_chip_gib': p['memory_bytes']['total'] / GIB,
                 'hbm_gib': p['hbm_bytes_per_device'] / GIB, 'fits': p['fits'],
                 'mfu_estimate': p.get('mfu_estimate'),
                 'estimated_seconds': p.get('estimated_seconds')}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='train step, memory only')
  parser.add_argument('--only', default='', help='run only cases whose key contains this')
  parser.add_argument('--resume', action='store_true', help='keep cases already written')
  parser.add_argument('--programs', default='',
                      help='compile only these programs (comma-separated) of each case; with '
                           '--resume, in place of those of the cases already written')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  redo = tuple(p for p in args.programs.split(',') if p)
  programs = redo or (('train_step',) if args.quick else aot.PROGRAMS)
  path = RESULTS / ('aot_quick.json' if args.quick else 'aot.json')
  reports = {}
  if args.resume and path.is_file():
    previous = json.loads(path.read_text())
    reports = previous['reports']
    for report in reports.values():  # each case keeps the commit it was compiled at
      report.setdefault('commit', previous['commit'])
  for name, arg, topology in CASES:
    key = f'{name}:{arg}@{topology}'
    if args.only not in key or (key in reports and not redo):
      continue
    t = time.perf_counter()
    report = aot.compile_report(load_config(name, arg), topology, programs=programs,
                                flops='none' if args.quick else 'loops')
    report['wall_seconds'] = time.perf_counter() - t
    report['commit'] = provenance()['commit']
    for p in report['programs'].values():
      p['commit'] = report['commit']
    print(aot.format_report(report), flush=True)
    reports[key] = merged(reports[key], report) if key in reports else report
    write(reports, args.quick)
  write(reports, args.quick)  # (--resume with every case done: rewrites aot.md from aot.json)


def merged(old: dict, new: dict) -> dict:
  """Case report `old` with the programs of `new` (compiled later) in place of its own: each
  program keeps the commit it was compiled at; the case's `fits` is over all its programs."""
  out = {**old, 'programs': {**old['programs']}}
  for p in out['programs'].values():
    p.setdefault('commit', old['commit'])
  out['programs'].update(new['programs'])
  out['fits'] = all(p['fits'] for p in out['programs'].values())
  out['masked_over_dense'] = aot.masked_over_dense(out['programs'])
  return out


def write(reports: dict, quick: bool) -> None:
  rows = [row(k.split('@')[0], r, p) for k, r in reports.items() for p in r['programs']]
  write_results('aot', {**{k: headline(r) for k, r in reports.items()}, 'reports': reports,
                        'libtpu': _libtpu_version()}, rows, HEADER, NOTES, quick=quick)


def _libtpu_version() -> str:
  from importlib.metadata import PackageNotFoundError, version
  try:
    return version('libtpu')
  except PackageNotFoundError:
    return 'absent'


if __name__ == '__main__':
  main()
