"""SCONE: validation perplexity of a baseline vs the same model with f-gram embeddings, at the
same accelerator-resident parameters, over the paper's two scaling axes, on two corpora:
- `tinyshakespeare` (`configs/shakespeare_decoder.py`, byte tokens, 262-token vocabulary);
- `python_docs`, the embedded default corpus (`configs/quickstart.py`, a 1024-token BPE
  vocabulary trained on it), where f-grams are n-grams of sub-word tokens.

Every run trains the largest sub-network of the corpus's config (`small` / the default; `tiny`
with --quick) alone (`train.sampling='standard'`) for the same steps and batches:
- baseline: SCONE off; and once more from another initialisation seed (same batches), whose
  distance from the first (`ppl_baseline_seed_gap`) shows how far one run moves by chance;
- SCONE: for each number of f-grams S in the grid and each of two f-gram model sizes, the same
  model trained jointly with its f-gram model; after training the table is precomputed and the
  validation perplexity is measured the way inference runs: f-gram ids looked up on the host,
  table rows gathered there and fed to the model (`fgram_emb`), no f-gram model on the device.
The accelerator-resident parameters of every run are the baseline's (`cost.arch_cost`); the
table lives on the host (`table_mb`), the f-gram model only during training. For the largest S
the perplexity is also measured with only the first n_used f-grams (the elastic dimension, one
trained model, `ppl_by_n_used`). `lookup_us_per_token`: host time of the lookup (hash, verify,
longest match, gather of the rows) per token over the validation batches.

Top-level keys hold one value per corpus. `falls_with_fgrams` / `falls_with_model`: whether the
perplexity falls strictly along each axis (every step of the grid), per corpus.

  python bench/bench_scone.py [--quick] [--corpora tinyshakespeare,python_docs] [--workdir W]
      [--jobs 2]

The runs of a corpus are independent: they train in `--jobs` worker processes at once (2 by
default, one per core here). With --workdir W every run trains in W/<corpus>/ and is kept; a run
already trained there resumes at its last checkpoint (a finished one only re-evaluates:
`train_seconds` null, `resumed` true). Without it, a temporary directory is used and removed.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from common import in_workers, write_results

from elastic_jax import cost, data, evaluation
from elastic_jax.scone import job
from elastic_jax.scone import table as table_lib
from elastic_jax.scone.config import scone_config
from elastic_jax.scone.fgrams import Fgrams
from elastic_jax.train.trainer import train
from elastic_jax.workdir import build_space, load_supernet

REPO = Path(__file__).resolve().parents[1]
CORPORA = {'tinyshakespeare': 'shakespeare_decoder.py', 'python_docs': 'quickstart.py'}


def corpus_config(corpus: str, quick: bool):
  spec = importlib.util.spec_from_file_location('c', REPO / 'configs' / CORPORA[corpus])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if quick:
    return module.get_config('tiny')
  return module.get_config('small' if corpus == 'tinyshakespeare' else '')


def base_config(corpus: str, quick: bool):
  cfg = corpus_config(corpus, quick)
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


def falls(values) -> bool:
  return all(b < a for a, b in zip(values, values[1:]))


class Run(NamedTuple):
  """One training run of the grid: its workdir name, the f-gram model size's index (-1 and size
  None for a baseline), the f-gram count and the initialisation seed."""
  name: str
  size_index: int
  size: dict | None
  num_fgrams: int
  seed: int = 0


def run_config(corpus: str, quick: bool, size: dict | None = None, num_fgrams: int = 0,
               seed: int = 0):
  """The bench config of one run: the baseline (size None) or SCONE with an f-gram model size and
  number of f-grams; `seed` seeds the initialisation only (the batches stay the same)."""
  cfg = base_config(corpus, quick)
  cfg.seed = seed
  if size is not None:
    cfg.scone.enabled = True
    cfg.scone.update(num_fgrams=num_fgrams, **size)
  return cfg


def train_run(corpus: str, quick: bool, workdir: Path, size: dict | None = None,
              num_fgrams: int = 0, seed: int = 0) -> dict:
  """Trains one run (or resumes it) and measures its validation perplexity, the way inference
  runs for SCONE (host lookup of the precomputed table). Runs in a worker process."""
  cfg = run_config(corpus, quick, size, num_fgrams, seed)
  resumed = (workdir / 'checkpoints').is_dir()
  t = time.perf_counter()
  train(cfg, workdir, progress=False)
  seconds = None if resumed else time.perf_counter() - t
  table = load_table(cfg, workdir) if size is not None else None
  ppl = validation(cfg, workdir, table)
  return {'ppl': ppl, 'train_seconds': seconds, 'resumed': resumed,
          'table_mb': None if table is None else table.nbytes / 1e6}


def load_table(cfg, workdir: Path):
  model, _ = load_supernet(cfg, str(workdir))
  fgrams = job.run_fgrams(scone_config(cfg.scone), cfg.data, workdir)
  return table_lib.load(workdir / job.TABLE_DIR, table_lib.fingerprint(model, fgrams))


def run_corpus(corpus: str, quick: bool, root: Path, counts, sizes, jobs: int) -> dict:
  cfg = base_config(corpus, quick)
  space = build_space(cfg)
  resident = int(space.cost(space.largest())['params'])
  # The top-S f-grams are a prefix of the top-S' for S < S' (a fixed order): extract once.
  t = time.perf_counter()
  all_fgrams = job.run_fgrams(scone_config(run_config(corpus, quick, sizes[0], max(counts)).scone),
                              cfg.data, root / 'extract')
  extract_seconds = time.perf_counter() - t
  print(f'{len(all_fgrams):,} f-grams extracted in {extract_seconds:.1f} s', flush=True)
  scone_runs = [Run(f'scone_{si}_{s}', si, size, s) for si, size in enumerate(sizes)
                for s in counts]
  runs = [Run('baseline', -1, None, 0), Run('baseline_seed1', -1, None, 0, seed=1), *scone_runs]
  for r in scone_runs:
    s = r.num_fgrams
    Fgrams(all_fgrams.tokens_SK[:s], all_fgrams.lengths_S[:s], all_fgrams.counts_S[:s],
           all_fgrams.min_count).save(root / r.name / job.FGRAMS)
  # Independent runs in worker processes (spawned: JAX does not survive a fork), the largest
  # f-gram model first; 2 CPU processes of 1 run each train faster than 2 cores on one model.
  done = in_workers(
      train_run, {r.name: (corpus, quick, root / r.name, r.size, r.num_fgrams, r.seed)
                  for r in sorted(runs, key=lambda r: -r.size_index)},
      jobs, log=lambda msg: print(f'{corpus} {msg}', flush=True))
  ppl_baseline = done['baseline']['ppl']
  ppl_seed1 = done['baseline_seed1']['ppl']
  grid, lookup_us, by_n_used = [], None, {}
  for w, si, size, s, _ in scone_runs:
    c = run_config(corpus, quick, size, s)
    scone_space = build_space(c)
    extra = cost.scone_cost(space.model, space.cfg.supernet_dims().hidden,
                            scone_config(c.scone), s)
    grid.append({'corpus': corpus, 'fgram_model': si, **size, 'num_fgrams': s, **done[w],
                 'resident_params': resident,
                 'resident_params_scone': int(scone_space.cost(scone_space.largest())['params']),
                 'fgram_model_params': extra['fgram_model_params']})
    if w == scone_runs[-1].name:  # the largest f-gram model with the most f-grams
      table = load_table(c, root / w)
      lookup_us = lookup_cost(c, table)
      for n_used in sorted({s // 16, s // 4, s}):
        by_n_used[str(n_used)] = validation(c, root / w, table, n_used)
  best = min(grid, key=lambda r: r['ppl'])
  by_size = [[r['ppl'] for r in grid if r['fgram_model'] == si] for si in range(len(sizes))]
  by_count = list(zip(*by_size))
  return {'ppl_baseline': ppl_baseline, 'ppl_baseline_seed1': ppl_seed1,
          'ppl_baseline_seed_gap': abs(ppl_seed1 - ppl_baseline), 'ppl_scone': best['ppl'],
          'lookup_us_per_token': lookup_us, 'table_mb': best['table_mb'],
          'resident_params': resident, 'grid': grid,
          'ppl_by_n_used': by_n_used, 'extracted_fgrams': len(all_fgrams),
          'extract_seconds': extract_seconds,
          'falls_with_fgrams': all(falls(p) for p in by_size),
          'falls_with_model': all(falls(p) for p in by_count), 'steps': cfg.train.steps}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='tiny model, few steps (minutes)')
  parser.add_argument('--workdir', default=None,
                      help='keep every run in WORKDIR/<corpus>/ and resume runs found there')
  parser.add_argument('--jobs', type=int, default=2,
                      help='runs trained at once, each in its own process (default 2: one per core '
                      'of the 2-core machine the results come from)')
  parser.add_argument('--corpora', default=','.join(CORPORA),
                      help=f'comma-separated, of {", ".join(CORPORA)}')
  args = parser.parse_args()
  quick = args.quick
  corpora = [c for c in args.corpora.split(',') if c]
  if args.jobs < 1:
    parser.error(f'--jobs={args.jobs}: give at least 1')
  unknown = sorted(set(corpora) - set(CORPORA))
  if unknown or not corpora:
    parser.error(f'--corpora: unknown {unknown}; choose from {", ".join(CORPORA)}')
  counts = (200, 1000) if quick else (1000, 4000, 16000)
  sizes = ({'layers': 1, 'width': 16, 'heads': 2, 'ffn': 32},
           {'layers': 2, 'width': 48, 'heads': 2, 'ffn': 96}) if quick else \
          ({'layers': 1, 'width': 32, 'heads': 2, 'ffn': 64},
           {'layers': 1, 'width': 64, 'heads': 2, 'ffn': 128})
  per = {}
  for corpus in corpora:
    if args.workdir:
      root = Path(args.workdir) / corpus
      root.mkdir(parents=True, exist_ok=True)
      per[corpus] = run_corpus(corpus, quick, root, counts, sizes, args.jobs)
      continue
    root = Path(tempfile.mkdtemp(prefix=f'bench_scone_{corpus}_'))
    try:
      per[corpus] = run_corpus(corpus, quick, root, counts, sizes, args.jobs)
    finally:
      shutil.rmtree(root, ignore_errors=True)
  keys = ('ppl_baseline', 'ppl_baseline_seed1', 'ppl_baseline_seed_gap', 'ppl_scone',
          'lookup_us_per_token', 'table_mb', 'falls_with_fgrams', 'falls_with_model',
          'resident_params', 'extracted_fgrams', 'extract_seconds', 'ppl_by_n_used')
  results = {k: {c: r[k] for c, r in per.items()} for k in keys}
  results['grid'] = [row for r in per.values() for row in r['grid']]
  results['steps'] = next(iter(per.values()))['steps']
  rows = []
  for corpus, r in per.items():
    rows.append((corpus, 'baseline', '-', '-', f"{r['ppl_baseline']:.3f}", '0',
                 f"{r['resident_params']:,}"))
    rows.append((corpus, 'baseline, init seed 1', '-', '-', f"{r['ppl_baseline_seed1']:.3f}", '0',
                 f"{r['resident_params']:,}"))
    rows += [(corpus, f"{g['layers']}x{g['width']}", f"{g['fgram_model_params']:,}",
              g['num_fgrams'], f"{g['ppl']:.3f}", f"{g['table_mb']:.2f}",
              f"{g['resident_params_scone']:,}") for g in r['grid']]
  notes = [f"{results['steps']} training steps per run (same batches with and without SCONE)."]
  for corpus, r in per.items():
    notes.append(
        f"- {corpus}: best SCONE {r['ppl_scone']:.3f} vs baseline {r['ppl_baseline']:.3f} "
        f"(another init seed moves it by {r['ppl_baseline_seed_gap']:.3f}); "
        f"falls with the f-gram count: {r['falls_with_fgrams']}, with the f-gram model: "
        f"{r['falls_with_model']}; lookup {r['lookup_us_per_token']:.2f} us/token on the host; "
        f"{r['extracted_fgrams']:,} f-grams extracted in {r['extract_seconds']:.1f} s; "
        f"perplexity by n_used (largest run, one model): {r['ppl_by_n_used']}")
  path = write_results('bench_scone', results, rows,
                       ('corpus', 'f-gram model', 'its params (training only)', 'f-grams',
                        'val ppl', 'table MB', 'resident params'), '\n'.join(notes), quick=quick)
  print(path)


if __name__ == '__main__':
  main()
