"""Population evaluation: masked + one compile versus slice-and-recompile (whittle's way).

Scores the validation loss of P distinct architectures of a ~10M-parameter decoder supernet on the
same tokens, two ways, in one run, compile times included:
- masked: the supernet evaluates every arch as data, `jax.lax.map` over the population inside one
  jitted call (one compile; with `--chunk 1` each arch runs alone, so `lax.switch` skips its
  removed layers; a larger chunk vmaps archs together and runs every layer);
- slice-and-recompile: export each arch to its own dense model and `jax.jit` its loss (one compile
  per architecture, as a PyTorch supernet that slices weights must recompile per sub-network).
Reports the speedup, the agreement of the two losses, and the useful share of executed FLOPs
(sum of the sub-networks' own FLOPs / FLOPs the masked evaluation executed).

  python bench/bench_population.py            # full: 64 archs
  python bench/bench_population.py --quick    # 16 archs
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from common import timed, write_results
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import evaluation, export
from elastic_jax.config import ModelConfig, space_config
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

MODEL = ModelConfig(kind='decoder', vocab_size=2048, max_len=128, positions='rotary',
                    norm='rmsnorm', mlp='gelu', use_bias=False)
SPACE = dict(num_layers=6, hidden=[128, 192, 256, 320, 384], depth=[2, 3, 4, 5, 6],
             blocks=['transformer'], heads=[2, 4, 6], head_dim=[64], ffn=[384, 768, 1152, 1536])


def executed_flops(space: Space, archs, narrowed: bool = False) -> np.ndarray:
  """FLOPs/token the masked path executes per arch, archs run one at a time: lax.switch skips
  removed layers, and lax.cond skips FFN column blocks past the active width and query-head
  blocks past the active head count (the space's FFN and head choices are the block bounds), so
  a kept layer runs its own FFN and its own query heads (their scores, context and output
  projection), but its K and V projections at every KV group of the supernet, and all of it at
  the supernet's hidden size. `narrowed` (search.hidden_buckets): at the arch's own hidden size."""
  full = space.largest()
  hidden = archs.hidden if narrowed else jnp.full_like(archs.hidden, full.hidden)
  own_heads = archs.replace(hidden=hidden)
  flops = jax.vmap(lambda a: space.cost(a)['flops_per_token'])(own_heads)
  # K and V of the groups past the arch's own: 2 projections x 2 FLOPs per multiply-add.
  idle_groups = jnp.where(archs.layer_on(), full.kv_groups - archs.kv_groups, 0)
  kv = 4.0 * hidden * archs.head_dim * jnp.sum(idle_groups, axis=-1)
  return np.asarray(flops + kv)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='16 archs instead of 64')
  parser.add_argument('--archs', type=int, default=None)
  parser.add_argument('--batches', type=int, default=1, help='validation batches of 8 x 128')
  parser.add_argument('--chunk', type=int, default=1, help='archs vmapped together')
  args = parser.parse_args()
  n = args.archs or (16 if args.quick else 64)

  space = Space(MODEL, space_config(SPACE), seq_len=128)
  model = Model(MODEL, space.cfg.supernet_dims(), rngs=nnx.Rngs(0))
  supernet_params = export.param_count(model)
  rng = np.random.default_rng(0)
  batches = [{'tokens': rng.integers(0, MODEL.vocab_size, (8, 128), dtype=np.int32),
              'targets': rng.integers(0, MODEL.vocab_size, (8, 128), dtype=np.int32),
              'weights': np.ones((8, 128), np.float32)} for _ in range(args.batches)]
  genomes = np.unique(np.asarray(space.random_genomes(jax.random.key(1), 4 * n)), axis=0)
  genomes = genomes[rng.permutation(len(genomes))[:n]]
  archs = jax.vmap(space.decode)(jnp.asarray(genomes))

  # Full width (hidden_buckets=()): the masked forward whose executed FLOPs are counted below.
  masked, masked_s = timed(lambda: evaluation.evaluate_population(
      model, batches, archs, chunk=args.chunk, hidden_buckets=())['loss'])

  def slice_and_recompile():
    losses = []
    for a in arch_lib.unstack(archs):
      dense = export.export(model, space.cfg, a)
      graphdef, state = nnx.split(dense)
      loss = jax.jit(lambda s, b, g=graphdef: evaluation.batch_sums(nnx.merge(g, s), b))
      sums = sum(np.asarray(loss(state, b)) for b in batches)
      losses.append(sums[0] / sums[1])
    return np.asarray(losses)

  sliced, sliced_s = timed(slice_and_recompile)
  rel_err = float(np.max(np.abs(masked - sliced) / np.abs(sliced)))
  own = np.asarray(jax.vmap(lambda a: space.cost(a)['flops_per_token'])(archs))
  executed = executed_flops(space, archs) if args.chunk == 1 else \
      np.full(n, float(space.cost(space.largest())['flops_per_token']))
  useful = float(own.sum() / executed.sum())
  speedup = sliced_s / masked_s
  results = {
      'speedup': round(speedup, 2),
      'useful_flop_share': round(useful, 3),
      'archs': n, 'tokens_per_arch': args.batches * 8 * 128, 'chunk': args.chunk,
      'supernet_params': supernet_params,
      'masked_seconds': round(masked_s, 2), 'masked_compiles': 1,
      'slice_recompile_seconds': round(sliced_s, 2), 'slice_recompile_compiles': n,
      'archs_per_second_masked': round(n / masked_s, 2),
      'archs_per_second_slice_recompile': round(n / sliced_s, 2),
      'max_relative_loss_difference': rel_err,
  }
  rows = [('masked population, 1 compile', n, f'{masked_s:.1f}', f'{n / masked_s:.2f}'),
          (f'slice and recompile, {n} compiles', n, f'{sliced_s:.1f}', f'{n / sliced_s:.2f}')]
  notes = (f'Supernet {supernet_params / 1e6:.1f}M parameters; {n} distinct archs, '
           f'{args.batches * 1024} validation tokens each. Speedup **{speedup:.1f}x**; useful '
           f'FLOP share {useful:.2f}; losses agree to {rel_err:.1e} relative.')
  write_results('bench_population', results, rows, ('method', 'archs', 'seconds (incl. compile)',
                                                    'archs/s'), notes, quick=args.quick)
  print(notes)


if __name__ == '__main__':
  main()
