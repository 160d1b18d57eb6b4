"""SCONE on tinyshakespeare: validation perplexity of a baseline vs the same model with f-gram
embeddings, at the same accelerator-resident parameters, over the paper's two scaling axes.

Every run trains the largest sub-network of `configs/shakespeare_decoder.py` (`small`; `tiny`
with --quick) alone (`train.sampling='standard'`) for the same steps and batches:
- baseline: SCONE off;
- SCONE: for each number of f-grams S in the grid and each of two f-gram model sizes, the same
  model trained jointly with its f-gram model; after training the table is precomputed and the
  validation perplexity is measured the way inference runs: f-gram ids looked up on the host,
  table rows gathered there and fed to the model (`fgram_emb`), no f-gram model on the device.
The accelerator-resident parameters of every run are the baseline's (`cost.arch_cost`); the
table lives on the host (`table_mb`), the f-gram model only during training. For the largest S
the perplexity is also measured with only the first n_used f-grams (the elastic dimension, one
trained model, `ppl_by_n_used`). `lookup_us_per_token`: host time of the lookup (hash, verify,
longest match, gather of the rows) per token over the validation batches.

  python bench/bench_scone.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

from common import write_results

from elastic_jax import cost, data, evaluation
from elastic_jax.scone import job
from elastic_jax.scone import table as table_lib
from elastic_jax.scone.config import scone_config
from elastic_jax.scone.fgrams import Fgrams
from elastic_jax.train.trainer import train
from elastic_jax.workdir import build_space, load_supernet

REPO = Path(__file__).resolve().parents[1]


def shakespeare_config(arg):
  spec = importlib.util.spec_from_file_location('sd', REPO / 'configs' / 'shakespeare_decoder.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def base_config(quick: bool):
  cfg = shakespeare_config('tiny' if quick else 'small')
  cfg.train.sampling = 'standard'
  cfg.train.eval_archs = ('largest',)
  cfg.train.steps = 60 if quick else 800
  cfg.train.eval_every = 0
  cfg.train.checkpoint_every = cfg.train.steps
  cfg.train.log_every = cfg.train.steps
  cfg.data.eval_batches = 4 if quick else 8
  return cfg


def validation(cfg, workdir, table=None, n_used=None) -> float:
  model, _ = load_supernet(cfg, str(workdir))
  batches = data.eval_batches(cfg.data)
  if table is not None:
    batches = [table(b, n_used) for b in batches]
  return evaluation.evaluate(model, batches, build_space(cfg).largest())['perplexity']


def lookup_cost(cfg, table) -> float:
  batches = data.eval_batches(cfg.data)
  table(batches[0])  # warm caches
  start = time.perf_counter()
  for b in batches:
    table(b)
  seconds = time.perf_counter() - start
  return 1e6 * seconds / sum(b['tokens'].size for b in batches)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='tiny model, few steps (minutes)')
  args = parser.parse_args()
  quick = args.quick
  counts = (200, 1000) if quick else (1000, 4000, 16000)
  sizes = ({'layers': 1, 'width': 16, 'heads': 2, 'ffn': 32},
           {'layers': 2, 'width': 48, 'heads': 2, 'ffn': 96}) if quick else \
          ({'layers': 1, 'width': 64, 'heads': 2, 'ffn': 128},
           {'layers': 2, 'width': 128, 'heads': 4, 'ffn': 256})
  root = Path(tempfile.mkdtemp(prefix='bench_scone_'))
  try:
    cfg = base_config(quick)
    space = build_space(cfg)
    resident = int(space.cost(space.largest())['params'])
    t = time.perf_counter()
    train(cfg, root / 'baseline', progress=False)
    ppl_baseline = validation(cfg, root / 'baseline')
    print(f'baseline: ppl {ppl_baseline:.3f} ({time.perf_counter() - t:.0f} s)', flush=True)
    # The top-S f-grams are a prefix of the top-S' for S < S' (a fixed order): extract once.
    c = base_config(quick)
    c.scone.enabled = True
    c.scone.num_fgrams = max(counts)
    t = time.perf_counter()
    all_fgrams = job.run_fgrams(scone_config(c.scone), c.data, root / 'extract')
    print(f'{len(all_fgrams):,} f-grams extracted in {time.perf_counter() - t:.1f} s', flush=True)
    grid, lookup_us, by_n_used = [], None, {}
    for si, size in enumerate(sizes):
      for s in counts:
        c = base_config(quick)
        c.scone.enabled = True
        c.scone.update(num_fgrams=s, **size)
        w = root / f'scone_{si}_{s}'
        Fgrams(all_fgrams.tokens_SK[:s], all_fgrams.lengths_S[:s], all_fgrams.counts_S[:s],
               all_fgrams.min_count).save(w / job.FGRAMS)
        t = time.perf_counter()
        train(c, w, progress=False)
        seconds = time.perf_counter() - t
        model, _ = load_supernet(c, str(w))
        fgrams = job.run_fgrams(scone_config(c.scone), c.data, w)
        table = table_lib.load(w / job.TABLE_DIR, table_lib.fingerprint(model, fgrams))
        ppl = validation(c, w, table)
        extra = cost.scone_cost(space.model, space.cfg.supernet_dims().hidden,
                                scone_config(c.scone), len(fgrams))
        row = {'fgram_model': si, **size, 'num_fgrams': len(fgrams), 'ppl': ppl,
               'table_mb': table.nbytes / 1e6, 'resident_params': resident,
               'fgram_model_params': extra['fgram_model_params'], 'train_seconds': seconds}
        grid.append(row)
        print(row, flush=True)
        if si == len(sizes) - 1 and s == counts[-1]:
          lookup_us = lookup_cost(c, table)
          for n_used in sorted({len(fgrams) // 16, len(fgrams) // 4, len(fgrams)}):
            by_n_used[str(n_used)] = validation(c, w, table, n_used)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  best = min(grid, key=lambda r: r['ppl'])
  results = {'ppl_baseline': ppl_baseline, 'ppl_scone': best['ppl'],
             'lookup_us_per_token': lookup_us, 'table_mb': best['table_mb'],
             'resident_params': resident, 'grid': grid, 'ppl_by_n_used': by_n_used,
             'steps': cfg.train.steps}
  rows = [('baseline', '-', '-', f'{ppl_baseline:.3f}', '0', f'{resident:,}')]
  rows += [(f"{r['layers']}x{r['width']}", f"{r['fgram_model_params']:,}", r['num_fgrams'],
            f"{r['ppl']:.3f}", f"{r['table_mb']:.2f}", f"{r['resident_params']:,}")
           for r in grid]
  notes = (f"tinyshakespeare, {cfg.train.steps} steps per run; lookup {lookup_us:.2f} us/token "
           f"on the host; perplexity by n_used (largest run): {by_n_used}")
  path = write_results('bench_scone', results, rows,
                       ('f-gram model', 'its params (training only)', 'f-grams', 'val ppl',
                        'table MB', 'resident params'), notes, quick=quick)
  print(path)


if __name__ == '__main__':
  main()
