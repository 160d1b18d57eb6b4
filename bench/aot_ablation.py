"""Where the masked training step's time goes on a TPU slice: an ablation compiled on this CPU.

A case's supernet step on v5e:4x4 (its own mesh, batch, micro-batches, dtypes), on a twin with
fewer layers (default 2, layers unrolled, so XLA counts each once and no FLOP-counting twin is
compiled), with one mechanism changed at a time, next to the dense reference step (the largest
sub-network's export trained by a plain cross-entropy step; `aot.dense_program`). Each row:
XLA's FLOPs and HBM bytes per device per step (loop bodies times their trip counts, as
`elastic-jax compile` counts them), the roofline time, the MFU estimate and the masked step's time
per model FLOP over the dense reference's of the same variant. Cases: `gpt2_medium_supernet` (the
default) writes bench/results/aot_ablation.json (top-level keys: the variants' labels -> their
figures) and .md; `bert_base_elm` (ELM's space: two block types per layer, block-preserving
distillation, masked LM) writes aot_ablation_bert_base_elm.json and .md.

  pip install -e '.[tpu]'
  python bench/aot_ablation.py [--case gpt2_medium_supernet|bert_base_elm] [--quick] [--layers 2]

--quick: the first two variants only.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from common import load_config, write_results  # noqa: E402

from elastic_jax import aot  # noqa: E402

# (label, config overrides, programs): one mechanism changed at a time.
GPT2_VARIANTS = (
    ('as configured', {}, ('train_step', 'dense_step')),
    ('parameters left to XLA (train.gather_params=False)', {'train.gather_params': False},
     ('train_step', 'dense_step')),
    ('static archs masked (train.dense_static_archs=False)', {'train.dense_static_archs': False},
     ('train_step',)),
    ('K = 2 sub-networks (train.num_random=0)', {'train.num_random': 0}, ('train_step',)),
    ('no logits distillation (train.distill.logits_kl=0)', {'train.distill.logits_kl': 0.0},
     ('train_step',)),
    ('float32 compute (model.dtype=float32)', {'model.dtype': 'float32'},
     ('train_step', 'dense_step')),
    ('einsum attention (model.attention=einsum)', {'model.attention': 'einsum'},
     ('train_step', 'dense_step')),
    ('vocabulary 8,192 (model.vocab_size=8192)', {'model.vocab_size': 8192},
     ('train_step', 'dense_step')),
    ('head / FFN blocks skipped by lax.cond (model.skip_width_blocks=True)',
     {'model.skip_width_blocks': True}, ('train_step',)),
    ('no width segments (space.ffn=(4096,), space.heads=(16,))',
     {'space.ffn': (4096,), 'space.heads': (16,)}, ('train_step',)),
)
GB, GIB = 1e9, 1024 ** 3
BERT_VARIANTS = (
    ('as configured', {}, ('train_step', 'dense_step')),
    ('static archs masked (train.dense_static_archs=False)', {'train.dense_static_archs': False},
     ('train_step',)),
    ('K = 2 sub-networks (train.num_random=0)', {'train.num_random': 0}, ('train_step',)),
    ('no block-preserving loss (train.distill.block_preserving=0)',
     {'train.distill.block_preserving': 0.0}, ('train_step',)),
    ('no logits distillation (train.distill.logits_kl=0)', {'train.distill.logits_kl': 0.0},
     ('train_step',)),
    ('BERT blocks only (space.blocks=(transformer,))', {'space.blocks': ('transformer',)},
     ('train_step',)),
    ('vocabulary at every position (data.mlm_max_predictions=0)',
     {'data.mlm_max_predictions': 0}, ('train_step', 'dense_step')),
)
HEADER = ('variant', 'program', 'XLA TFLOP / device', 'HBM GB / device', 'est. ms', 'MFU est.',
          'masked / dense', 'GiB / device', 'compile s')
GPT2_INTRO = """
The GPT-2-medium supernet's training step (configs/gpt2_medium_supernet.py, v5e-16: batch 128 x
512 in {accum} micro-batch(es), model.remat='{remat}', pure FSDP over 16 chips, bf16 compute,
sandwich K = 4 with in-place logits distillation) compiled by libtpu for v5e:4x4 on a CPU, on a
twin with {layers} layers (unrolled: XLA counts each once; rematerialised as configured) and one
mechanism changed per row."""
BERT_INTRO = """
The BERT-base ELM supernet's training step (configs/bert_base_elm.py, v5e-16: batch 256 x 128 in
{accum} micro-batch(es), model.remat='{remat}', pure FSDP over 16 chips, bf16 compute, sandwich
K = 4 with in-place logits distillation and ELM's block-preserving loss; each layer a `lax.switch`
between a BERT block and a MobileBERT-style bottleneck block; the masked-LM vocabulary read at
the predicted positions, data.mlm_max_predictions) compiled by libtpu for v5e:4x4 on a CPU, on a
twin with {layers} layers (unrolled: XLA counts each once; rematerialised as configured) and one
mechanism changed per row."""
COMMON = """ train_step is the sandwich
step the trainer runs (its largest and smallest sub-networks as dense slices of the supernet, the
two random ones masked; train.dense_static_archs; attention by the Pallas splash kernel,
model.attention='splash'); dense_step the reference, the largest
sub-network's dense export trained by a plain cross-entropy step with the same batch,
micro-batches, optimizer and shardings.
FLOPs and bytes: XLA's cost analysis per device per step, the micro-batch loop's body times its
trip count (x {accum}; the masked step counted on a twin with its K sub-networks unrolled). est. ms:
the roofline max(FLOPs / peak, bytes / HBM bandwidth) (197 TFLOP/s, 819 GB/s per v5e chip);
every row is byte-bound there. MFU est.: the sub-networks' analytic model FLOPs (cost.py) over
peak x est. masked / dense: the masked step's estimated time per model FLOP over the dense
reference's of the same row (a row without its own dense step uses the first row's)."""
GPT2_TAIL = """ With so few layers the vocabulary (50,304 x 1,024, tied) weighs far more than in the
24-layer model: read the rows against each other, and bench/results/aot.md for the full model. As
configured, the masked sub-networks compute every head and FFN unit and mask the inactive ones
(model.skip_width_blocks off on TPU); the lax.cond row skips the blocks past their active sizes
instead (XLA charges a conditional its costliest branch, so what skipping saves is not in the
estimate, what the conditionals add is). No width segments: every sub-network has all 16 heads and
the 4,096-wide FFN (the sub-networks' model FLOPs grow with them). Each masked layer is a
`lax.switch` between its block and the identity (a layer past the sub-network's depth;
configs/bert_base_elm.py adds a second block type): XLA counts the block, so a masked sub-network
shallower than the twin is charged for the layers it skips.
"""
BERT_TAIL = """ XLA charges each layer's `lax.switch` its costliest branch: a masked sub-network's
bottleneck layers are counted at the cost of the costlier block (the BERT-blocks-only row has no
switch between block types).
"""
# case -> (config, argument, topology), variants, the notes' first and last parts.
CASES = {
    'gpt2_medium_supernet': (('gpt2_medium_supernet', 'v5e-16', 'v5e:4x4'), GPT2_VARIANTS,
                             GPT2_INTRO + COMMON + GPT2_TAIL),
    'bert_base_elm': (('bert_base_elm', 'v5e-16', 'v5e:4x4'), BERT_VARIANTS,
                      BERT_INTRO + COMMON + BERT_TAIL),
}


def compile_variant(case: tuple, layers: int, overrides: dict, programs: tuple) -> dict:
  name, arg, topology = case
  cfg = load_config(name, arg)
  with cfg.unlocked():
    fixed_depth = tuple(cfg.space.depth) == (cfg.space.num_layers,)
    cfg.space.num_layers = layers
    cfg.space.depth = (layers,) if fixed_depth else tuple(range(1, layers + 1))
    cfg.model.scan_layers = False
    cfg.update_from_flattened_dict(overrides)
  t = time.perf_counter()
  report = aot.compile_report(cfg, topology, programs=programs)
  report['wall_seconds'] = time.perf_counter() - t
  print(aot.format_report(report), flush=True)
  return report


def figures(p: dict) -> dict:
  """One program's row; for a program the TPU compiler refuses as too large for HBM, only the
  memory it needs (FLOPs, bytes, time and compile seconds None)."""
  scaled = lambda key, unit: None if p.get(key) is None else p[key] / unit
  return {'xla_tflop_per_device': scaled('xla_flops_per_device', 1e12),
          'hbm_gb_per_device': scaled('xla_bytes_accessed_per_device', GB),
          'estimated_ms': scaled('estimated_seconds', 1e-3), 'mfu_estimate': p.get('mfu_estimate'),
          'memory_gib_per_device': p['memory_bytes']['total'] / GIB, 'fits': p['fits'],
          'compile_seconds': p.get('compile_seconds')}


def cell(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--case', default='gpt2_medium_supernet', choices=sorted(CASES))
  parser.add_argument('--quick', action='store_true', help='the first two variants only')
  parser.add_argument('--layers', type=int, default=2, help='layers of the twin')
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  case, variants, notes = CASES[args.case]
  variants = variants[:2] if args.quick else variants
  results, rows, reference = {}, [], None
  base = load_config(*case[:2])
  notes = notes.format(layers=args.layers, accum=base.train.grad_accum, remat=base.model.remat)
  stem = 'aot_ablation' + ('' if args.case == 'gpt2_medium_supernet' else f'_{args.case}')
  for label, overrides, programs in variants:
    report = compile_variant(case, args.layers, overrides, programs)
    ps = report['programs']
    dense = ps.get('dense_step') or reference
    reference = reference or dense
    entry = {name: figures(p) for name, p in ps.items()}
    mfus = (dense and dense.get('mfu_estimate'), ps['train_step'].get('mfu_estimate'))
    entry['masked_over_dense'] = mfus[0] / mfus[1] if all(mfus) else None
    entry['overrides'] = overrides
    results[label] = entry
    for name in ps:
      f = entry[name]
      ratio = entry['masked_over_dense'] if name == 'train_step' else None
      rows.append((label, name, cell(f['xla_tflop_per_device'], '.2f'),
                   cell(f['hbm_gb_per_device'], '.1f'), cell(f['estimated_ms'], '.0f'),
                   cell(f['mfu_estimate'], '.1%'), cell(ratio, '.2f') + ('x' if ratio else ''),
                   f"{f['memory_gib_per_device']:.2f}" + ('' if f['fits'] else ' (does not fit)'),
                   cell(f['compile_seconds'], '.0f')))
    write_results(stem, {**results, 'layers': args.layers, 'case': list(case)}, rows,
                  HEADER, notes, quick=args.quick)


if __name__ == '__main__':
  main()
