"""The search job on a trained tinyshakespeare supernet: throughput and quality, in one run.

1. Throughput, architectures evaluated per second *including compile*, on the same validation
   tokens:
   - masked population (this design): a whole NSGA-II search (`elastic_jax.search.driver.Searcher`),
     every generation's population evaluated through the supernet in one compiled call, one
     compile for the whole search, each arch on the supernet narrowed to its hidden choice as the
     search job does by default (`search.hidden_buckets`; not with --chunk > 1);
   - slice-and-recompile (whittle's way): export each architecture the search evaluated to its own
     dense model and `jax.jit` its loss, one compile per architecture.
   Also reports the agreement of the two losses and the useful share of executed FLOPs (the
   sub-networks' own FLOPs / the FLOPs the masked evaluation executed; see
   bench_population.executed_flops).
2. Quality: hypervolume of (validation loss, parameters) fronts of NSGA-II versus random search
   (and stratified random search) at equal numbers of evaluations, averaged over seeds, with the
   search job's default reference point (loss: the smallest architecture's loss plus 10% of its gap
   to the largest one's; parameters: 1.1 x the largest count), and two other reference points.

The supernet is a byte-level decoder trained here with `elastic_jax.train.trainer.train` (sandwich
rule, in-place distillation) on ../shared/data/tinyshakespeare; the workdir is reused, so a second
run skips training.

  python bench/bench_search.py              # full (an accelerator is recommended)
  python bench/bench_search.py --quick      # CPU-sized: smaller space, fewer steps
  python bench/bench_search.py --untrained  # no training (smoke test of the script only)

Writes bench/results/bench_search.json (top-level: speedup, useful_flop_share, hv_evolution,
hv_random) and bench_search.md (bench_search_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from bench_population import executed_flops
from common import timed, write_results
from flax import nnx

from elastic_jax import data, evaluation
from elastic_jax import export as export_lib
from elastic_jax.search import config as search_cfg
from elastic_jax.search import fitness as fitness_lib
from elastic_jax.search import genomes as genomes_lib
from elastic_jax.search import job
from elastic_jax.search.hypervolume import hypervolume_nd
from elastic_jax.workdir import build_space, init_supernet

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(os.environ.get('ELASTIC_JAX_SHARED_DATA', REPO.parent / 'shared' / 'data')) \
    / 'tinyshakespeare' / 'input.txt'
STRATEGIES = ('nsga2', 'random', 'stratified')


def shakespeare_config(quick: bool, train_steps: int | None) -> ml_collections.ConfigDict:
  """A byte-level decoder supernet on tinyshakespeare paragraphs."""
  from elastic_jax.train import config as train_config  # noqa: PLC0415

  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.model = ml_collections.ConfigDict(dict(
      kind='decoder', vocab_size=262, max_len=128, positions='rotary', norm='rmsnorm',
      norm_placement='pre', mlp='swiglu', tie_embeddings=True, use_bias=False, dtype='float32'))
  cfg.space = ml_collections.ConfigDict(dict(
      num_layers=4 if quick else 6,
      hidden=[64, 96, 128] if quick else [128, 192, 256],
      depth=[1, 2, 3, 4] if quick else [2, 3, 4, 5, 6],
      blocks=['transformer'], heads=[2, 4], kv_groups=[1, 2],
      head_dim=[16, 32] if quick else [32, 64],
      ffn=[128, 256, 384, 512] if quick else [256, 512, 768, 1024]))
  cfg.data = data.default_config()
  cfg.data.source = 'text_files'
  cfg.data.paths = [str(SHAKESPEARE)]
  cfg.data.doc_boundary = 'blank_line'
  cfg.data.task = 'causal_lm'
  cfg.data.tokenizer = 'bytes'
  cfg.data.seq_len = 64 if quick else 128
  cfg.data.batch_size = 16 if quick else 32
  cfg.data.eval_batches = 4 if quick else 8
  cfg.train = train_config.default_config()
  cfg.train.steps = train_steps or (300 if quick else 1500)
  cfg.train.warmup_steps = max(1, cfg.train.steps // 20)
  cfg.train.learning_rate = 3e-3
  cfg.train.log_every = 50
  cfg.train.eval_every = 0
  cfg.train.checkpoint_every = cfg.train.steps
  cfg.mesh = train_config.default_mesh()
  cfg.search = search_cfg.default_config()
  return cfg


def supernet(cfg, workdir: Path, untrained: bool):
  space = build_space(cfg)
  if untrained:
    return space, init_supernet(cfg, space), None, 0.0
  from elastic_jax import checkpoints  # noqa: PLC0415
  from elastic_jax.train import trainer  # noqa: PLC0415
  model = init_supernet(cfg, space)
  step = checkpoints.restore_params_if_any(workdir, model)
  seconds = 0.0
  if step is None or step < cfg.train.steps:
    start = time.perf_counter()
    trainer.train(cfg, workdir, progress=False)
    seconds = time.perf_counter() - start
  model, step = job.load_trained_supernet(cfg, workdir, space)
  return space, model, step, seconds


def slice_and_recompile(model, space, genomes, batches) -> np.ndarray:
  """Loss of each genome's exported dense model, one `jax.jit` (one compile) per architecture."""
  losses = []
  for genome in genomes:
    dense = export_lib.export(model, space.cfg, space.decode(jnp.asarray(genome)))
    graphdef, state = nnx.split(dense)
    loss = jax.jit(lambda s, b, g=graphdef: evaluation.batch_sums(nnx.merge(g, s), b))
    sums = sum(np.asarray(loss(state, b)) for b in batches)
    losses.append(sums[0] / sums[1])
  return np.asarray(losses)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='CPU-sized run')
  parser.add_argument('--untrained', action='store_true', help='skip training (smoke test)')
  parser.add_argument('--workdir', default=None, help='supernet workdir (reused between runs)')
  parser.add_argument('--train-steps', type=int, default=None)
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--generations', type=int, default=None)
  parser.add_argument('--pop', type=int, default=None, help='population = children/generation')
  parser.add_argument('--chunk', type=int, default=1, help='archs vmapped together')
  parser.add_argument('--slice-archs', type=int, default=None,
                      help='architectures timed with slice-and-recompile')
  parser.add_argument('--job', action='store_true',
                      help='afterwards, run the search job itself on the supernet (WORKDIR/search)')
  args = parser.parse_args()
  if not SHAKESPEARE.is_file():
    sys.exit(f'{SHAKESPEARE} not found (set ELASTIC_JAX_SHARED_DATA)')
  generations = args.generations or (12 if args.quick else 25)
  pop = args.pop or (16 if args.quick else 32)
  n_slice = args.slice_archs or (16 if args.quick else 24)
  workdir = Path(args.workdir or f'/tmp/elastic_jax_bench_search{"_quick" if args.quick else ""}')
  cfg = shakespeare_config(args.quick, args.train_steps)
  cfg.data.cache_dir = str(workdir / 'cache')

  space, model, step, train_seconds = supernet(cfg, workdir, args.untrained)
  batches = data.eval_batches(cfg.data)
  tokens = int(sum(float(np.sum(b['weights'])) for b in batches))
  # The search job's own evaluation: its default hidden_buckets (each arch on the supernet
  # narrowed to its hidden choice; Fitness leaves it off where it cannot apply, chunk > 1).
  fit = fitness_lib.Fitness(space, ('loss', 'params'), model=model, batches=batches,
                            chunk=args.chunk,
                            hidden_buckets=search_cfg.search_config({}).hidden_buckets)
  narrowed = bool(fit.fn.hidden_buckets)
  extremes = fit.extremes()
  ref = fit.reference_point(extremes=extremes)  # the search job's default reference point
  ref_min = fit.to_minimised(ref)
  n_archs = space.describe()["architectures"]
  print(f"supernet step {step} ({train_seconds:.0f} s training), {n_archs:,}"
        f' architectures, {export_lib.param_count(model) / 1e6:.2f}M parameters; {tokens} '
        f'validation tokens; {generations} generations x {pop} evaluations', flush=True)

  # 1 + 2: every strategy and seed at an equal budget; the first NSGA-II run includes the compile.
  runs = {s: [] for s in STRATEGIES}
  for strategy in STRATEGIES:
    sc = search_cfg.search_config({'search': {'strategy': strategy, 'pop_size': pop,
                                              'n_children': pop}})
    searcher = job.make_searcher(fit, strategy, pop_size=pop, n_children=pop,
                                 generations_per_call=generations, archive_size=sc.archive_size,
                                 **search_cfg.strategy_kwargs(sc, space))
    for seed in range(args.seeds):
      (state, hist), seconds = timed(lambda s=searcher, k=seed: s.advance(
          s.init_state(), jax.random.key(k), 0, generations))
      st = jax.tree.map(np.asarray, state)
      mask = st.occupied_P & st.feasible_P
      hv = hypervolume_nd(st.fitness_PxM, ref_min, mask)
      curve = [hypervolume_nd(f, ref_min, m) for f, m in zip(hist['fitness'], hist['mask'])]
      runs[strategy].append({'seed': seed, 'hv': hv, 'hv_curve': curve, 'seconds': seconds,
                             'n_evals': int(hist['n_evals'][-1]), 'hist': hist,
                             'best_loss': float(hist['best'][-1, 0])})
      print(f'{strategy} seed {seed}: hypervolume {hv:.5g}, best loss '
            f'{hist["best"][-1, 0]:.4f}, {seconds:.1f} s', flush=True)

  first = runs['nsga2'][0]
  masked_rate = first['n_evals'] / first['seconds']
  steady_rate = (np.mean([r['n_evals'] / r['seconds'] for r in runs['nsga2'][1:]])
                 if args.seeds > 1 else masked_rate)
  # Distinct networks the first search evaluated and kept at some point, with their masked losses.
  hist = first['hist']
  g_all = hist['genomes'][hist['mask']]
  f_all = hist['fitness'][hist['mask']]
  canon = np.asarray(genomes_lib.canonical_genomes(space, jnp.asarray(g_all)))
  _, first_idx = np.unique(canon, axis=0, return_index=True)
  rng = np.random.default_rng(0)
  distinct = rng.permutation(np.sort(first_idx))
  chosen = distinct[:n_slice]
  sliced, sliced_s = timed(lambda: slice_and_recompile(model, space, g_all[chosen], batches))
  slice_rate = len(chosen) / sliced_s
  rel_err = float(np.max(np.abs(f_all[chosen, 0] - sliced) / np.abs(sliced)))
  archs = jax.vmap(space.decode)(jnp.asarray(g_all[distinct]))
  own = np.asarray(jax.vmap(lambda a: space.cost(a)['flops_per_token'])(archs))
  executed = executed_flops(space, archs, narrowed=narrowed) if args.chunk == 1 else \
      np.full(len(own), float(space.cost(space.largest())['flops_per_token']))
  useful = float(own.sum() / executed.sum())
  speedup = masked_rate / slice_rate

  hv = {s: np.asarray([r['hv'] for r in runs[s]]) for s in STRATEGIES}
  # Two other references as a check that the verdict does not depend on the reference point:
  # 'tight' (1.01 x the worst loss and size any final population holds) and 'lnV' (the loss of a
  # uniform predictor, ln(vocab); the parameter axis then dominates the volume).
  finals = [(r['hist']['fitness'][-1], r['hist']['mask'][-1]) for s in STRATEGIES for r in runs[s]]
  tight = np.max(np.concatenate([f[m] for f, m in finals]), axis=0) * np.array([1.01, 1.01])
  ln_v = np.array([np.log(cfg.model.vocab_size), ref_min[1]])
  hv_tight, hv_lnv = ({s: np.asarray([hypervolume_nd(r['hist']['fitness'][-1], point,
                                                     r['hist']['mask'][-1]) for r in runs[s]])
                       for s in STRATEGIES} for point in (tight, ln_v))
  wins = int(np.sum(hv['nsga2'] > hv['random']))
  results = {
      'speedup': round(speedup, 2),
      'useful_flop_share': round(useful, 3),
      'hv_evolution': float(hv['nsga2'].mean()),
      'hv_random': float(hv['random'].mean()),
      'hv_stratified': float(hv['stratified'].mean()),
      'hv_evolution_per_seed': hv['nsga2'].tolist(), 'hv_random_per_seed': hv['random'].tolist(),
      'hv_stratified_per_seed': hv['stratified'].tolist(),
      'evolution_beats_random_seeds': f'{wins}/{args.seeds}',
      'hv_reference_point': ref.tolist(),
      'loss_smallest_arch': float(extremes['loss'][0]),
      'loss_largest_arch': float(extremes['loss'][1]),
      'hv_tight_reference_point': tight.tolist(),
      'hv_tight_evolution': float(hv_tight['nsga2'].mean()),
      'hv_tight_random': float(hv_tight['random'].mean()),
      'hv_tight_stratified': float(hv_tight['stratified'].mean()),
      'hv_lnV_reference_point': ln_v.tolist(),
      'hv_lnV_evolution': float(hv_lnv['nsga2'].mean()),
      'hv_lnV_random': float(hv_lnv['random'].mean()),
      'hv_lnV_stratified': float(hv_lnv['stratified'].mean()),
      'hv_curve_evolution': np.mean([r['hv_curve'] for r in runs['nsga2']], axis=0).tolist(),
      'hv_curve_random': np.mean([r['hv_curve'] for r in runs['random']], axis=0).tolist(),
      'best_loss_evolution': float(np.mean([r['best_loss'] for r in runs['nsga2']])),
      'best_loss_random': float(np.mean([r['best_loss'] for r in runs['random']])),
      'archs_per_second_masked_incl_compile': round(masked_rate, 2),
      'archs_per_second_masked_steady': round(float(steady_rate), 2),
      'archs_per_second_slice_recompile': round(slice_rate, 3),
      'masked_seconds_first_search': round(first['seconds'], 2),
      'evaluations_per_search': first['n_evals'], 'generations': generations,
      'population': pop, 'seeds': args.seeds, 'chunk': args.chunk, 'hidden_buckets': narrowed,
      'slice_recompile_archs': len(chosen), 'slice_recompile_seconds': round(sliced_s, 2),
      'distinct_archs_for_flop_share': len(distinct),
      'max_relative_loss_difference': rel_err,
      'validation_tokens': tokens, 'supernet_step': step, 'trained': step is not None,
      'train_seconds': round(train_seconds, 1),
      'supernet_params': export_lib.param_count(model),
      'space_architectures': space.describe()['architectures'],
  }
  rows = [
      ('masked population search, 1 compile', first['n_evals'], f"{first['seconds']:.1f}",
       f'{masked_rate:.2f}'),
      (f'slice and recompile, {len(chosen)} compiles', len(chosen), f'{sliced_s:.1f}',
       f'{slice_rate:.3f}'),
  ]
  hv_line = ', '.join(f'{s} {hv[s].mean():.5g} ± {hv[s].std():.2g}' for s in STRATEGIES)
  notes = (
      f"Supernet {results['supernet_params'] / 1e6:.2f}M parameters, "
      f"{'trained ' + str(step) + ' steps' if step else 'UNTRAINED (smoke test)'} on "
      f"tinyshakespeare (bytes); {results['space_architectures']:,} architectures; {tokens} "
      f"validation tokens per evaluation. Throughput (incl. compile): **{speedup:.1f}x** "
      f'({masked_rate:.1f} vs {slice_rate:.2f} archs/s; masked steady state {steady_rate:.1f}); '
      f'useful FLOP share {useful:.2f}; losses agree to {rel_err:.1e} relative. '
      f'Hypervolume (loss, params) after {first["n_evals"]} evaluations, mean ± std over '
      f'{args.seeds} seeds: {hv_line}; NSGA-II beats random in {wins}/{args.seeds} seeds '
      f"(reference {ref.round(4).tolist()}; with the tight reference: nsga2 "
      f"{hv_tight['nsga2'].mean():.4g} vs random {hv_tight['random'].mean():.4g}; with ln(V): "
      f"nsga2 {hv_lnv['nsga2'].mean():.4g} vs random {hv_lnv['random'].mean():.4g}).")
  write_results('bench_search', results, rows,
                ('method', 'archs', 'seconds (incl. compile)', 'archs/s'), notes,
                quick=args.quick)
  print(notes)
  if args.job:
    cfg.search.update(pop_size=pop, generations=generations, checkpoint_every=5, latency_max=8,
                      allow_untrained=args.untrained, chunk=args.chunk)
    result = job.run_search(cfg, workdir)
    print(result['table'])
    print(f"hypervolume {result['hypervolume']:.6g}; plot {result['plot']}")


if __name__ == '__main__':
  main()
