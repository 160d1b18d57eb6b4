"""Population evaluation against the real peer: masked population vs whittle eager vs JAX slicing.

The same distinct sub-networks of one decoder supernet (bench_population's: 6 layers, hidden
128-384, 2-6 heads of 64 and FFN 384-1536 per layer, vocabulary 2048, RMSNorm, rotary, GELU) score
their validation loss on the same tokens, four ways, in one run:
- masked: elastic_jax's supernet evaluates every arch as data, `jax.lax.map` over the population in
  one jitted call (`evaluation.evaluate_population`, chunk 1: removed layers are skipped), each
  arch on the supernet narrowed to its hidden choice (`hidden_buckets`, what the search does by
  default); and once more at the supernet's full width (masked only), for comparison;
- whittle: whittle 0.6.0 (PyTorch eager, CPU) in its own environment (bench/peers/whittle, made by
  its setup.sh), `GPT.set_sub_network` + forward per arch, at each torch thread count given;
- dense exports: each arch exported to its own dense model and `jax.jit`-ed (one compile per arch);
- bucketed slicing: the best a slicing design can do in JAX. Each arch is exported padded to its
  widest layer (every layer gets the arch's largest head count and FFN width, the extra heads' V/O
  and FFN columns zero, so the loss is unchanged), archs of equal padded shape share one compiled
  program, and the persistent compilation cache is on; 'warm' re-runs the pass after
  `jax.clear_caches()`, every program then read from that cache.
The masked population's 'warm' pass is the same: its one program read from the persistent cache
(what a later search on the same supernet and shapes pays; the CLI keeps that cache by default).
Time including compile (the first pass, what a search pays) and the steady state (the same pass
again) are reported separately, with the useful share of executed FLOPs (sub-networks' own FLOPs /
FLOPs executed). Losses of the three JAX ways must agree; whittle's weights are its own random
initialisation (the timing does not depend on them), so its parameter count per sub-network is
checked against ours instead (litgpt keeps a separate output projection: + hidden x vocabulary).

The sweep: population sizes at 1,024 tokens per arch, and token counts at 16 archs; the slicing
ways (and the full-width masked forward) stop at `--slice_max_population` archs (one compile per
program makes them the slowest). Results are rewritten after every setting.

  bash bench/peers/whittle/setup.sh              # once: whittle's own environment
  python bench/bench_peers.py                     # full sweep (~45 min on a 2-core CPU)
  python bench/bench_peers.py --quick             # 16 and 64 archs at 1,024 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_population import MODEL, SPACE, executed_flops
from common import timed, write_results
from flax import nnx
from jax._src import compilation_cache  # reset_cache: a fresh persistent cache per setting

from elastic_jax import arch as arch_lib
from elastic_jax import evaluation, export
from elastic_jax.config import space_config
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

PEER = Path(__file__).resolve().parent / 'peers' / 'whittle'
SEQ = 128
BATCH = 8


def whittle_supernet(space: Space) -> dict:
  """litgpt Config fields of the supernet bench_population's model is (MHA, no biases)."""
  s = space.cfg
  return dict(name='elastic-jax-bench', n_layer=s.num_layers, n_embd=max(s.hidden),
              n_head=max(s.heads), head_size=max(s.head_dim), n_query_groups=max(s.heads),
              intermediate_size=max(s.ffn), vocab_size=MODEL.vocab_size,
              padded_vocab_size=MODEL.vocab_size, block_size=SEQ, bias=False,
              norm_class_name='RMSNorm', norm_eps=MODEL.norm_eps, mlp_class_name='GptNeoxMLP',
              gelu_approximate='none', rotary_percentage=1.0, parallel_residual=False)


def whittle_arch(a) -> dict:
  depth = int(a.depth)
  return {'n_embd': int(a.hidden), 'n_layers': depth,
          'heads': [int(h) for h in np.asarray(a.heads)[:depth]],
          'ffn': [int(f) for f in np.asarray(a.ffn)[:depth]]}


def run_whittle(python: str, space: Space, archs: list, tokens: np.ndarray, threads: list[int]
                ) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    np.save(f'{tmp}/tokens.npy', tokens)
    spec = {'supernet': whittle_supernet(space), 'tokens': f'{tmp}/tokens.npy', 'batch': BATCH,
            'archs': [whittle_arch(a) for a in archs], 'threads': threads, 'seed': 0}
    Path(f'{tmp}/spec.json').write_text(json.dumps(spec))
    subprocess.run([python, str(PEER / 'eval_subnets.py'), '--spec', f'{tmp}/spec.json',
                    '--out', f'{tmp}/out.json'], check=True)
    return json.loads(Path(f'{tmp}/out.json').read_text())


def jax_batches(tokens: np.ndarray) -> list[dict]:
  return [{'tokens': tokens[i:i + BATCH, :-1], 'targets': tokens[i:i + BATCH, 1:],
           'weights': np.ones((BATCH, SEQ), np.float32)} for i in range(0, len(tokens), BATCH)]


def loss_of(split, batches) -> float:
  """`evaluation.evaluate` of a split dense model: one compiled program per distinct graphdef."""
  return evaluation.evaluate(nnx.merge(*split), batches)['loss']


def programs_compiled() -> int:
  return evaluation._sums_one._cache_size()


def padded(model, space: Space, a):
  """The arch exported with every layer at its widest layer's heads and FFN width, the extra
  heads' V and O and the extra FFN columns zero: the same function on shapes shared by more
  archs."""
  heads = int(np.max(np.asarray(a.heads)[:int(a.depth)]))
  ffn = int(np.max(np.asarray(a.ffn)[:int(a.depth)]))
  wide = a.replace(heads=jnp.full_like(a.heads, heads), kv_groups=jnp.full_like(a.kv_groups, heads),
                   ffn=jnp.full_like(a.ffn, ffn))
  graphdef, state = nnx.split(export.export(model, space.cfg, wide))
  own_heads, own_ffn = np.asarray(a.heads), np.asarray(a.ffn)

  def zero(path, x):
    keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    if 'layers' not in keys:
      return x
    layer = keys[keys.index('layers') + 1]
    h, f = int(own_heads[layer]), int(own_ffn[layer])
    name = keys[-2] if keys[-1] == 'value' else keys[-1]
    x = np.array(x)
    if name == 'v':
      x[:, h:, :] = 0
    elif name == 'o':
      x[h:] = 0
    elif name == 'up':
      x[:, f:] = 0
    elif name == 'down':
      x[f:] = 0
    return x

  state = jax.tree_util.tree_map_with_path(zero, state)
  flops = float(space.cost(wide)['flops_per_token'])
  return (graphdef, state), flops


def sliced_pass(model, space, archs, batches, pad: bool):
  """Losses, seconds and programs compiled for one pass of export (+ pad) + jit + evaluate."""
  before = programs_compiled()
  start = time.perf_counter()
  losses, flops = [], []
  splits = []
  for a in archs:
    if pad:
      split, f = padded(model, space, a)
    else:
      split, f = nnx.split(export.export(model, space.cfg, a)), float(
          space.cost(a)['flops_per_token'])
    losses.append(loss_of(split, batches))
    flops.append(f)
    splits.append(split)
  seconds = time.perf_counter() - start
  return np.asarray(losses), seconds, programs_compiled() - before, np.asarray(flops), splits


def steady_pass(splits, batches) -> float:
  start = time.perf_counter()
  for split in splits:
    loss_of(split, batches)
  return time.perf_counter() - start


def fresh_caches():
  """Every program of a setting is compiled anew: in-memory jit caches cleared and a new, empty
  persistent compilation cache directory (archs of earlier settings may share shapes)."""
  jax.clear_caches()
  compilation_cache.reset_cache()
  jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='jax-cache-'))


def one_setting(model, space, genomes_all, population: int, n_tokens: int, args, python):
  rng = np.random.default_rng(population * 7919 + n_tokens)
  genomes = genomes_all[rng.permutation(len(genomes_all))[:population]]
  fresh_caches()
  archs = jax.vmap(space.decode)(jnp.asarray(genomes))
  arch_list = arch_lib.unstack(archs)
  tokens = rng.integers(0, MODEL.vocab_size, (n_tokens // SEQ, SEQ + 1), dtype=np.int32)
  batches = jax_batches(tokens)
  row = {'population': population, 'tokens_per_arch': n_tokens}
  print(f'-- {population} archs x {n_tokens} tokens', flush=True)

  stacked = evaluation.stack_batches(batches)
  own = np.asarray(jax.vmap(lambda a: space.cost(a)['flops_per_token'])(archs))
  losses = {}
  ways = (('masked', tuple(SPACE['hidden'])),)
  if population <= args.slice_max_population:
    ways += (('masked_full_width', ()),)
  for key, buckets in ways:
    run = lambda b=buckets: evaluation.evaluate_population(model, stacked, archs, chunk=1,
                                                           hidden_buckets=b)['loss']
    losses[key], first = timed(run)
    _, steady = timed(run)
    executed = executed_flops(space, archs, narrowed=bool(buckets)).sum()
    row[key] = {'first_pass_seconds': first, 'steady_seconds': steady, 'compiles': 1,
                'useful_flop_share': float(own.sum() / executed)}
    if key == 'masked':  # a new process's first pass, its program in the persistent cache
      jax.clear_caches()
      row[key]['warm_cache_first_pass_seconds'] = timed(run)[1]
    print(f'   {key}: {first:.2f}s incl. compile, {steady:.2f}s steady', flush=True)
  masked = losses['masked']
  if 'masked_full_width' in losses:
    row['narrowed_vs_full_width_max_relative_difference'] = float(
        np.max(np.abs(masked - losses['masked_full_width']) / np.abs(masked)))

  if population <= args.slice_max_population:
    dense, first, compiles, _, splits = sliced_pass(model, space, arch_list, batches, pad=False)
    row['dense_exports'] = {'first_pass_seconds': first, 'steady_seconds': steady_pass(splits,
                            batches), 'compiles': compiles, 'useful_flop_share': 1.0}
    jax.clear_caches()
    bucketed, first, compiles, flops, splits = sliced_pass(model, space, arch_list, batches,
                                                           pad=True)
    steady = steady_pass(splits, batches)
    jax.clear_caches()
    _, warm, _, _, _ = sliced_pass(model, space, arch_list, batches, pad=True)
    row['bucketed_slicing'] = {'first_pass_seconds': first, 'steady_seconds': steady,
                               'warm_cache_first_pass_seconds': warm, 'compiles': compiles,
                               'useful_flop_share': float(own.sum() / flops.sum())}
    row['max_relative_loss_difference'] = float(max(
        np.max(np.abs(masked - dense) / np.abs(dense)),
        np.max(np.abs(bucketed - dense) / np.abs(dense))))
    for k in ('dense_exports', 'bucketed_slicing'):
      print(f"   {k}: {row[k]['first_pass_seconds']:.2f}s incl. {row[k]['compiles']} compiles, "
            f"{row[k]['steady_seconds']:.2f}s steady", flush=True)

  if python:
    peer = run_whittle(python, space, arch_list, tokens, args.threads)
    best = min(peer['by_threads'], key=lambda t: peer['by_threads'][t]['first_pass_seconds'])
    ours = np.asarray(jax.vmap(lambda a: space.cost(a)['params'])(archs)) \
        + np.asarray(archs.hidden) * MODEL.vocab_size
    row['whittle'] = {'by_threads': peer['by_threads'], 'best_threads': int(best),
                      'first_pass_seconds': peer['by_threads'][best]['first_pass_seconds'],
                      'steady_seconds': min(v['steady_seconds'] for v in
                                            peer['by_threads'].values()),
                      'params_agree': int(np.sum(np.asarray(peer['params']) == ours)),
                      'load_average': peer['load_average'], 'torch': peer['torch']}
    w = row['whittle']
    row['speedup_vs_whittle_incl_compile'] = w['first_pass_seconds'] / row['masked'][
        'first_pass_seconds']
    row['speedup_vs_whittle_steady'] = w['steady_seconds'] / row['masked']['steady_seconds']
    row['speedup_vs_whittle_warm_cache'] = w['first_pass_seconds'] / row['masked'][
        'warm_cache_first_pass_seconds']
  if 'dense_exports' in row:
    row['masked_steady_over_dense_steady'] = row['masked']['steady_seconds'] / row[
        'dense_exports']['steady_seconds']
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='16 and 64 archs at 1,024 tokens')
  parser.add_argument('--populations', default='16,64,256,512')
  parser.add_argument('--tokens', default='8192,32768',
                      help='tokens per arch swept at 16 archs (beside 1,024)')
  parser.add_argument('--threads', default='1,2', help='torch thread counts tried for whittle')
  parser.add_argument('--slice_max_population', type=int, default=64)
  parser.add_argument('--whittle_python', default=str(PEER / '.venv' / 'bin' / 'python'),
                      help="whittle's environment ('' = leave whittle out)")
  args = parser.parse_args()
  args.threads = [int(t) for t in args.threads.split(',')]
  if args.quick:
    args.populations, args.tokens = '16,64', ''
  settings = [(int(p), 1024) for p in args.populations.split(',')]
  settings += [(16, int(t)) for t in args.tokens.split(',') if t and (16, int(t)) not in settings]
  python = args.whittle_python
  if python and not Path(python).exists():
    sys.exit(f"whittle's environment {python} is missing: run bash bench/peers/whittle/setup.sh "
             "(or pass --whittle_python '' to leave whittle out)")

  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

  space = Space(MODEL, space_config(SPACE), seq_len=SEQ)
  model = Model(MODEL, space.cfg.supernet_dims(), rngs=nnx.Rngs(0))
  biggest = max(p for p, _ in settings)
  genomes = np.unique(np.asarray(space.random_genomes(jax.random.key(1), 4 * biggest)), axis=0)
  if len(genomes) < biggest:
    sys.exit(f'the space gave {len(genomes)} distinct archs, fewer than {biggest}')
  rows = []
  for p, t in settings:  # results rewritten after every setting: a cut-short run keeps its rows
    rows.append(one_setting(model, space, genomes, p, t, args, python))
    report(rows, model, args, done=len(rows) == len(settings))


def report(rows: list[dict], model, args, done: bool):
  head = next((r for r in rows if r['population'] == 64 and r['tokens_per_arch'] == 1024), rows[0])
  largest = max(rows, key=lambda r: r['population'])
  results = {
      'speedup_vs_whittle_incl_compile': head.get('speedup_vs_whittle_incl_compile'),
      'speedup_vs_whittle_steady': head.get('speedup_vs_whittle_steady'),
      'speedup_vs_whittle_warm_cache': head.get('speedup_vs_whittle_warm_cache'),
      'masked_steady_over_dense_steady': head.get('masked_steady_over_dense_steady'),
      'speedup_vs_whittle_incl_compile_largest_population':
          largest.get('speedup_vs_whittle_incl_compile'),
      'largest_population': largest['population'],
      'headline_setting': {'population': head['population'],
                           'tokens_per_arch': head['tokens_per_arch']},
      'complete': done, 'sweep': rows, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'supernet_params': int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
  }

  def fmt(r, k):
    if k not in r:
      return ('-', '-', '-')
    return (f"{r[k]['first_pass_seconds']:.1f}", f"{r[k]['steady_seconds']:.1f}",
            str(r[k].get('compiles', 0)))

  table = []
  for r in rows:
    for k, label in (('masked', 'masked population (hidden buckets: the search default)'),
                     ('masked_full_width', 'masked population, full width'),
                     ('whittle', 'whittle eager'),
                     ('dense_exports', 'dense exports, one jit each'),
                     ('bucketed_slicing', 'bucketed slicing')):
      if k in r:
        first, steady, compiles = fmt(r, k)
        extra = ''
        if k == 'whittle':
          extra = f"best {r[k]['best_threads']} thread(s); params agree {r[k]['params_agree']}/" \
                  f"{r['population']}"
        elif k in ('bucketed_slicing', 'masked'):
          extra = f"warm cache {r[k]['warm_cache_first_pass_seconds']:.1f}s"
        share = r[k].get('useful_flop_share')
        table.append((r['population'], r['tokens_per_arch'], label, first, steady, compiles,
                      '-' if share is None else f'{share:.2f}', extra))
  fig = lambda x: '-' if x is None else f'{x:.2f}x'
  at_largest = fig(results['speedup_vs_whittle_incl_compile_largest_population'])
  notes = (f"Masked population vs whittle {rows[0].get('whittle', {}).get('torch', '')} eager "
           f"(whittle 0.6.0) on {head['population']} archs x {head['tokens_per_arch']} tokens: "
           f"**{fig(results['speedup_vs_whittle_incl_compile'])} including compile, "
           f"{fig(results['speedup_vs_whittle_steady'])} steady**, "
           f"{fig(results['speedup_vs_whittle_warm_cache'])} with its program in the persistent "
           f"compilation cache (a later search on the same supernet and shapes); masked steady / "
           f"dense exports' "
           f"steady {fig(results['masked_steady_over_dense_steady'])}. At "
           f"{largest['population']} archs: {at_largest}"
           f" including compile. Seconds for the whole population; whittle at its best thread "
           f"count (steady: best of the counts tried)."
           + ('' if done else ' **Incomplete: the sweep was cut short.**'))
  write_results('bench_peers', results, table,
                ('archs', 'tokens/arch', 'method', 's incl. compile', 's steady', 'compiles',
                 'useful FLOP share', 'notes'), notes, quick=args.quick)
  print(notes)



if __name__ == '__main__':
  main()
