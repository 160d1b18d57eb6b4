"""ELM's ablation: what block-preserving distillation, width growth and head pruning each buy.

Masked LM on the embedded Python-docs corpus, a small BERT-style space with both of ELM's block
types per layer (BERT block, MobileBERT-style bottleneck; `configs/bert_elm.py:runlocal` at
hidden 128, 4 layers, FFN widths starting at hidden; sizes in SIZES), four supernets trained on
the same tokens (same steps, batch, sequence length, masking, seed), two at a time in worker
processes (--jobs):
  (1) plain:    sandwich rule, every sub-network on its own cross-entropy (no distillation)
  (2) +distill: distillation from the teacher: soft cross-entropy on the logits and ELM's
                block-preserving loss (train.distill.logits_kl = block_preserving = 1)
  (3) +growth:  (2) with PCA-guided FFN width growth (train.dynamic.growth_every)
  (4) +pruning: (3) with CKA head pruning (train.dynamic.prune_every)
The teacher (--teacher): `trained` (default), the initial space's largest architecture trained
alone on the same tokens without distillation and exported dense (made once, by the first
variant that needs it, in WORKDIR/teacher), every sub-network its student, as ELM distils from a
trained model; or `in-place`, the supernet's largest sub-network teaching the others. In place,
the block-preserving loss held every sub-network at the unigram loss (the run at c04861d): the
students share the teacher's weights, and all blocks' features agree most cheaply when they carry
nothing.
Each supernet is searched (NSGA-II on validation loss and parameters, the same search settings)
and its front's hypervolume is computed against ONE reference point shared by the four (the
worst loss of any front + 10% of the loss span, 1.1 x the most parameters of any front; params
in millions), so the numbers compare. Then the best front member under one parameter budget
(the middle of the initial space's parameter range) of each variant is exported and fine-tuned
on two small GLUE tasks (RTE, MRPC) with `elastic_jax.finetune` (`configs/finetune_glue.py`;
`--glue none` skips it, and the results say so).

  python bench/bench_elm.py --quick   # minutes: 40 steps at hidden 48, tiny search and GLUE
  python bench/bench_elm.py           # the committed run (about 90 minutes on a 2-core CPU)

Results: bench/results/bench_elm[_quick].{json,md}; top-level keys `hv` (per variant) and `glue`
(per variant, or the reason it was not run).
"""

from __future__ import annotations

import os

os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false')

import argparse  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from common import in_workers, load_config, write_results  # noqa: E402

from elastic_jax import arch as arch_lib  # noqa: E402
from elastic_jax import data, space_history  # noqa: E402
from elastic_jax import export as export_lib  # noqa: E402
from elastic_jax.search.hypervolume import hypervolume_nd  # noqa: E402
from elastic_jax.search.job import run_search  # noqa: E402
from elastic_jax.search.pick import choose, export_pick  # noqa: E402
from elastic_jax.search.report import load_pareto  # noqa: E402
from elastic_jax.train.trainer import train  # noqa: E402
from elastic_jax.workdir import build_space, load_supernet  # noqa: E402

VARIANTS = ('plain', 'distill', 'growth', 'pruning')
GLUE_TASKS = ('rte', 'mrpc')
# The full size is one found to learn in this budget (scratch runs of the plain variant, lr as
# below): hidden 48 with 15% of the tokens masked ended at 6.05 nats after 600 steps of 16 x 64
# tokens for every sub-network alike (the unigram distribution; the committed run at 0c82a09)
# and 5.83 after 2,000; hidden 128 with 40% masked (Wettig et al. 2023: 40% trains BERT-style
# models faster than 15%) and batch 32 reached 5.59 after 500 steps on the harder 40%-masked
# validation, the smallest sub-network behind the largest. Growth may take FFNs to 1.5 x hidden.
SIZES = {
    'quick': {'hidden': 48, 'embed_dim': 32, 'mask': 0.15, 'lr': 1e-3, 'default_steps': 40,
              'batch_size': 4, 'seq_len': 32, 'eval_batches': 2, 'pop_size': 8,
              'generations': 3},
    'full': {'hidden': 128, 'embed_dim': 128, 'mask': 0.4, 'lr': 2e-3, 'default_steps': 800,
             'batch_size': 32, 'seq_len': 64, 'eval_batches': 8, 'pop_size': 32,
             'generations': 30},
}


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def variant_config(name: str, args):
  cfg = load_config('bert_elm', 'runlocal')
  h = args.hidden  # FFN widths up to hidden in quarters; growth may reach 1.5 x hidden
  cfg.space.hidden, cfg.space.inner = (h,), (h // 4,)
  cfg.space.ffn = tuple(h // 4 * k for k in range(1, 5))
  cfg.model.embed_dim = args.embed_dim
  cfg.data.mlm_probability = args.mask
  cfg.data.batch_size = args.batch_size
  cfg.data.seq_len = args.seq_len
  cfg.data.eval_batches = args.eval_batches
  cfg.data.cache_dir = str(args.cache)
  t = cfg.train
  t.steps = args.steps
  t.learning_rate = args.lr
  t.warmup_steps = max(args.steps // 10, 1)
  t.log_every = max(args.steps // 10, 1)
  t.checkpoint_every = args.steps
  t.eval_every = 0
  t.sampling = 'sandwich'
  t.distill.logits_kl = 0.0 if name in ('plain', 'teacher') else 1.0
  t.distill.block_preserving = 0.0 if name in ('plain', 'teacher') else 1.0
  if name not in ('plain', 'teacher') and args.teacher == 'trained':
    t.distill.teacher = str(teacher_dir(args))
  if name in ('growth', 'pruning'):
    t.dynamic.growth_every = args.growth_every
    t.dynamic.pca_every = max(args.growth_every // 3, 1)
  if name == 'pruning':
    t.dynamic.prune_every = args.prune_every
  s = cfg.search
  s.pop_size, s.generations, s.n_children = args.pop_size, args.generations, 0
  s.objectives = ('loss', 'params')
  s.checkpoint_every = args.generations
  return cfg


def teacher_dir(args) -> Path:
  return args.root / 'teacher' / 'export'


def make_teacher(args) -> dict:
  """The dense teacher of variants 2-4 (--teacher trained): the initial space's largest
  architecture trained alone on the variants' tokens, without distillation, and exported. Made
  once: the first worker that needs it trains it while the others wait on a lock."""
  out, workdir = teacher_dir(args), args.root / 'teacher'
  workdir.mkdir(parents=True, exist_ok=True)
  with open(args.root / 'teacher.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    result_file = workdir / 'teacher_result.json'
    if export_lib.is_export(out) and result_file.is_file():
      return json.loads(result_file.read_text())
    cfg = variant_config('teacher', args)
    space = build_space(cfg)
    arch_file = workdir / 'arch.json'
    arch_file.write_text(arch_lib.dumps(space.largest()))
    cfg.train.arch = str(arch_file)
    cfg.train.eval_archs = (str(arch_file),)
    t0 = time.perf_counter()
    trained = train(cfg, workdir / 'run', progress=False)
    supernet, _ = load_supernet(cfg, str(workdir / 'run'), space)
    dense = export_lib.export(supernet, space.cfg, space.largest())
    export_lib.save(dense, out, arch=space.largest(), overwrite=True)
    result = {'train_seconds': time.perf_counter() - t0,
              'params': export_lib.param_count(dense),
              'eval': {k: v for k, v in trained.items() if k.startswith('eval/')}}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def teacher_note(teacher) -> str:
  if teacher == 'in-place':
    return "Teacher of variants 2-4: in place (the supernet's largest sub-network)."
  loss = teacher['eval'].get('eval/arch/loss', float('nan'))
  return (f"Teacher of variants 2-4: the largest architecture ({teacher['params']:,} parameters) "
          f'trained alone on the same tokens, validation loss {loss:.3f}.')


def front_points(pareto) -> np.ndarray:
  """(validation loss, params in millions) of the front members."""
  return np.asarray([[e['metrics']['loss'], e['metrics']['params'] / 1e6]
                     for e in pareto['front']], np.float64)


def train_variant(name: str, args) -> dict:
  """Trains and searches one variant in args.root / name (a worker process's job)."""
  cfg, workdir = variant_config(name, args), args.root / name
  if cfg.train.distill.teacher:
    make_teacher(args)
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.perf_counter()
  trained = train(cfg, workdir, progress=False)
  t_train = time.perf_counter() - t0
  result = run_search(cfg, workdir, log=_log)
  history = space_history.load(workdir)
  return {'train_seconds': t_train, 'search_seconds': result['seconds'],
          'eval': {k: v for k, v in trained.items() if k.startswith('eval/')},
          'events': history['events'] if history else []}


def finetune_best(name: str, budget: int, args) -> dict:
  """The best front member of variant `name` under `budget` parameters, exported and fine-tuned
  on GLUE_TASKS (a worker process's job)."""
  from elastic_jax.finetune import trainer as ft  # noqa: PLC0415
  cfg, workdir, log = variant_config(name, args), args.root / name, _log
  spec = f'best-under:params={budget}'
  pareto = load_pareto(workdir)
  index = choose(pareto, spec)
  out = workdir / 'export' / 'best_under_budget'
  export_pick(cfg, workdir, spec, out, overwrite=True)
  ft_cfg = load_config('finetune_glue', args.glue).finetune
  ft_cfg.cache_dir = str(args.cache)
  scores = {'front_index': index, 'params': pareto['front'][index]['metrics']['params'],
            'val_loss': pareto['front'][index]['metrics']['loss']}
  for task in GLUE_TASKS:
    result = ft.finetune(out, task, workdir / 'glue' / task, ft_cfg, log=log)
    scores[task] = {k: v for k, v in result['best'].items() if k not in ('train_loss', 'seconds')}
  return scores


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--quick', action='store_true', help='minutes, for CI (not the committed run)')
  p.add_argument('--steps', type=int)
  p.add_argument('--glue', choices=('quick', 'tiny', 'full', 'none'),
                 help="configs/finetune_glue.py argument ('full' = the W-PCA recipe)")
  p.add_argument('--workdir', help='keep the runs here (default: a temporary directory)')
  p.add_argument('--teacher', choices=('trained', 'in-place'), default='trained',
                 help="variants 2-4 distil from a dense model trained first ('trained') or from "
                      "the supernet's largest sub-network ('in-place')")
  p.add_argument('--jobs', type=int, default=2,
                 help='variants trained (and fine-tuned) at once in worker processes')
  a = p.parse_args()
  if a.jobs < 1:
    p.error(f'--jobs={a.jobs}: give at least 1')
  for key, value in SIZES['quick' if a.quick else 'full'].items():
    setattr(a, key, value)
  a.steps = a.steps or a.default_steps
  a.glue = a.glue or ('tiny' if a.quick else 'quick')
  a.growth_every = max(a.steps // 4, 1)
  a.prune_every = max(a.steps // 2, 1)
  a.root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix='bench_elm_'))
  a.cache = a.root / 'data_cache'
  log = _log

  data.eval_batches(variant_config('plain', a).data)  # the tokenizer and data cache, once
  done = in_workers(train_variant, {n: (n, a) for n in VARIANTS}, a.jobs, log)
  runs = {n: {**r, 'pareto': load_pareto(a.root / n)} for n, r in done.items()}
  points = {n: front_points(r['pareto']) for n, r in runs.items()}
  every = np.concatenate(list(points.values()))
  lo, hi = every[:, 0].min(), every[:, 0].max()
  ref = np.asarray([hi + 0.1 * max(hi - lo, 1e-6), 1.1 * every[:, 1].max()])
  hv = {n: float(hypervolume_nd(pts, ref)) for n, pts in points.items()}

  initial = build_space(variant_config('plain', a))
  p_lo, p_hi = initial.parameter_range()
  budget = int((p_lo + p_hi) / 2)
  if a.glue == 'none':
    glue = {'not_run': 'skipped (--glue none): masked-LM validation loss only'}
  else:
    glue = in_workers(finetune_best, {n: (n, budget, a) for n in VARIANTS}, a.jobs, log)

  rows = []
  for n in VARIANTS:
    r, g = runs[n], glue.get(n, {})
    grown = sum(len(e.get('grown', [])) for e in r['events'])
    pruned = sum(len(x['dropped']) for e in r['events'] for x in e.get('pruned', []))
    glue_cell = ' / '.join(f"{100 * g[t]['score']:.1f}" for t in GLUE_TASKS if t in g) or '-'
    rows.append((n, f'{hv[n]:.4f}', len(points[n]), f'{points[n][:, 0].min():.3f}',
                 f"{r['eval'].get('eval/largest/loss', float('nan')):.3f}", grown, pruned,
                 f"{g.get('params', 0) / 1e6:.3f}" if g else '-', glue_cell,
                 f"{r['train_seconds']:.0f}"))
  results = {
      'hv': hv,
      'glue': glue,
      'hv_ref_point': ref.tolist(),
      'glue_budget_params': budget,
      'settings': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
      'training_tokens': a.steps * a.batch_size * a.seq_len,
      'teacher': make_teacher(a) if a.teacher == 'trained' else 'in-place',
      'variants': {n: {'front': points[n].tolist(), 'train_seconds': r['train_seconds'],
                       'search_seconds': r['search_seconds'], 'final_eval': r['eval'],
                       'space_events': r['events']} for n, r in runs.items()},
  }
  notes = (f"Same {results['training_tokens']:,} training tokens per variant "
           f"({a.steps} steps x {a.batch_size} x {a.seq_len}). HV: front (validation loss, "
           f"params in M) against the shared reference {np.round(ref, 4).tolist()}; higher is "
           f"better. GLUE: the best front member under {budget:,} parameters, fine-tuned with "
           f"configs/finetune_glue.py:{a.glue} ({', '.join(GLUE_TASKS)} dev score, %). "
           + teacher_note(results['teacher']))
  header = ('variant', 'HV', 'front', 'best val loss', 'largest val loss', 'FFNs grown',
            'heads pruned', 'GLUE model params (M)', 'GLUE ' + '/'.join(GLUE_TASKS), 'train s')
  path = write_results('bench_elm', results, rows, header, notes, quick=a.quick)
  print(json.dumps({'hv': hv, 'glue': glue, 'results': str(path)}, indent=1, default=str))


if __name__ == '__main__':
  main()
