"""Data-pipeline throughput against training throughput: is data ever the bottleneck?

Measures tokens/s of the training streams `elastic_jax.data.train_iterator` yields, in this
process (data.num_workers = 0, the default): the quickstart's own data pipeline
(configs/quickstart.py), and on tinyshakespeare (../shared/data) the packed causal-LM pipeline and
the MLM pipeline, each with the byte and the BPE tokenizer, at the quickstart's sequence length,
batch size and BPE vocabulary. The target is at least 20x the tokens/s the quickstart training
step consumes on the same machine.

  python bench/bench_data.py [--quick] [--train-tokens-per-s X]

The training figure is measured in the same run by `bench_train.quickstart_train_tokens_per_second`
(the quickstart's real sandwich step), unless --train-tokens-per-s gives it. Writes
bench/results/bench_data.json (top-level key pipeline_over_train: the smallest pipeline tokens/s
over training tokens/s) and bench/results/bench_data.md (bench_data_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

import elastic_jax.data as data

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 20.0
TINYSHAKESPEARE_PIPELINES = (  # (name, task, tokenizer)
    ('tinyshakespeare causal_lm/bytes', 'causal_lm', 'bytes'),
    ('tinyshakespeare causal_lm/bpe', 'causal_lm', 'bpe'),
    ('tinyshakespeare mlm/bytes', 'mlm', 'bytes'),
    ('tinyshakespeare mlm/bpe', 'mlm', 'bpe'),
)


def _shared_data() -> Path:
  env = os.environ.get('ELASTIC_JAX_SHARED_DATA')
  return Path(env) if env else REPO.parent / 'shared' / 'data'


def quickstart_config():
  """configs/quickstart.py's get_config(), or None where the configs are not there."""
  path = REPO / 'configs' / 'quickstart.py'
  if not path.is_file():
    return None
  spec = importlib.util.spec_from_file_location('quickstart_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shakespeare_config(base, task: str, tokenizer: str, shakespeare: Path):
  """The quickstart's data settings, reading tinyshakespeare paragraphs instead."""
  cfg = base.copy_and_resolve_references()
  cfg.source = 'text_files'
  cfg.paths = [str(shakespeare)]
  cfg.doc_boundary = 'blank_line'
  cfg.task = task
  cfg.tokenizer = tokenizer
  return cfg


def measure(cfg, seconds: float) -> dict:
  """Tokens/s of the stream once running: the first batch (start-up) is timed separately."""
  start = time.perf_counter()
  it = data.train_iterator(cfg)
  next(it)
  startup = time.perf_counter() - start
  batches = 0
  start = time.perf_counter()
  while True:
    next(it)
    batches += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds and batches >= 5:
      break
  tokens = batches * cfg.batch_size * cfg.seq_len
  return {'tokens_per_s': tokens / elapsed, 'batches': batches, 'seconds': elapsed,
          'startup_seconds': startup}


def train_tokens_per_second(cfg, flag_value: float | None) -> tuple[float | None, str]:
  """Tokens/s of the quickstart's real training step, measured in this run (or given)."""
  if flag_value is not None:
    return flag_value, '--train-tokens-per-s'
  from bench_train import quickstart_train_tokens_per_second
  return quickstart_train_tokens_per_second(cfg), 'bench_train.quickstart_train_tokens_per_second'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='about 1 s per pipeline instead of 5')
  parser.add_argument('--train-tokens-per-s', type=float, default=None,
                      help='training tokens/s of the quickstart step, if bench_support is absent')
  parser.add_argument('--cache-dir', default='', help='dataset cache (default: a fresh temp dir)')
  args = parser.parse_args()

  shakespeare = _shared_data() / 'tinyshakespeare' / 'input.txt'
  if not shakespeare.is_file():
    sys.exit(f'bench_data: {shakespeare} not found; set ELASTIC_JAX_SHARED_DATA')
  seconds = 1.0 if args.quick else 5.0
  quickstart = quickstart_config()
  with tempfile.TemporaryDirectory() as tmp:
    cache_dir = args.cache_dir or tmp
    if quickstart is not None:
      quickstart.data.cache_dir = cache_dir
      base = quickstart.data
    else:
      base = data.default_config()
      base.cache_dir = cache_dir
    configs = {f'quickstart {base.task}/{base.source}/{base.tokenizer}': base}
    for name, task, tokenizer in TINYSHAKESPEARE_PIPELINES:
      configs[name] = shakespeare_config(base, task, tokenizer, shakespeare)
    pipelines = {}
    for name, cfg in configs.items():
      pipelines[name] = measure(cfg, seconds)
      print(f"{name:40s} {pipelines[name]['tokens_per_s']:>12,.0f} tokens/s", flush=True)
    train, train_source = train_tokens_per_second(
        quickstart if quickstart is not None else base, args.train_tokens_per_s)

  slowest = min(row['tokens_per_s'] for row in pipelines.values())
  ratio = round(slowest / train, 2) if train else None
  results = {
      'pipeline_over_train': ratio,
      'target': TARGET_RATIO,
      'meets_target': None if ratio is None else ratio >= TARGET_RATIO,
      'train_tokens_per_s': train,
      'train_source': train_source,
      'pipelines': pipelines,
      'seq_len': base.seq_len,
      'batch_size': base.batch_size,
  }
  rows = [(name, f"{row['tokens_per_s']:,.0f}",
           f"{row['tokens_per_s'] / train:.1f}" if train else 'n/a',
           f"{row['startup_seconds']:.2f}") for name, row in pipelines.items()]
  notes = (f'Training streams of `elastic_jax.data.train_iterator`, in-process (num_workers=0), '
           f'seq_len {base.seq_len}, batch {base.batch_size}; tinyshakespeare split into '
           f"paragraphs. Training step: {f'{train:,.0f} tokens/s' if train else 'not measured'} "
           f'({train_source}). pipeline_over_train = {ratio} (target >= {TARGET_RATIO:g}).')
  path = write_results('bench_data', results, rows,
                       ('pipeline', 'tokens/s', 'x training', 'start-up s'), notes, args.quick)
  print(f'pipeline_over_train = {ratio} ({train_source}); wrote {path} and .md')

if __name__ == '__main__':
  main()
