"""Training step cost: masked supernet versus the same network exported dense, in one run.

Three jitted AdamW steps on the same batches (the quickstart config's model and data):
- dense:    the largest sub-network exported as a dense model, trained standalone (the baseline);
- masked:   the same network as the supernet's largest arch, masked, through the trainer's step
            function (`train.sampling='standard'` with `train.dense_static_archs=False`, which
            would otherwise run that arch as its dense slice), its layers unrolled (the
            quickstart's CPU setting) and in a `lax.scan` (`model.scan_layers`, the default and
            the TPU configs' setting);
- sandwich: the trainer's default step (largest + smallest + 2 random, in-place KD), its
            sub-networks unrolled (`train.unroll_subnets`, the default), the largest and smallest
            as dense slices of the supernet (`train.dense_static_archs`, the default);
- sandwich, all masked: the same with all four masked (`train.dense_static_archs=False`);
- sandwich, looped: the default step with the masked sub-networks in a `lax.scan`.
Reports step times (median over timed steps, compile excluded), tokens/s, `masked_over_dense`
(target <= 1.15), `sandwich_over_dense`, `sliced_speedup` (all masked over the default sandwich)
and `looped_over_unrolled`; on a GPU also the model FLOP utilisation. Compile seconds of each step
(its first call) are reported beside.

  python bench/bench_train.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import write_results
from flax import nnx

from elastic_jax import data, evaluation, export
from elastic_jax.losses import token_cross_entropy
from elastic_jax.train import distill
from elastic_jax.train.sampling import Sampler
from elastic_jax.train.step import DistillSpec, TrainState, make_optimizer, make_train_step
from elastic_jax.train.trainer import dense_slices
from elastic_jax.workdir import build_space, init_supernet

REPO = Path(__file__).resolve().parents[1]
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}  # dense bf16 peak, per chip


def quickstart_config(arg=None):
  spec = importlib.util.spec_from_file_location('quickstart', REPO / 'configs' / 'quickstart.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def time_steps(step, state, batches, warmup=2):
  """(median seconds per step after `warmup` steps, seconds of the first call: compile included,
  final state)."""
  times = []
  for batch in batches:
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return statistics.median(times[warmup:]), times[0], state


def masked_step(cfg, space, strategy, unroll_subnets=True, dense_static=False):
  """The trainer's own step function for a sampling strategy; `dense_static`: its static archs
  as dense slices (`trainer.dense_slices`, train.dense_static_archs), else all masked."""
  model = init_supernet(cfg, space)
  graphdef, params = nnx.split(model, nnx.Param)
  proj = distill.Projections({}, rngs=nnx.Rngs(0))
  proj_graphdef, proj_params = nnx.split(proj, nnx.Param)
  tx, _ = make_optimizer(cfg.train)
  d = cfg.train.distill
  spec = DistillSpec(weights={k: float(d[k]) for k in ('ce', 'logits_kl', 'hidden_mse', 'attn_kl',
                                                      'block_preserving')},
                     temperature=1.0, in_place=True,
                     layer_map=distill.uniform_layer_map(space.num_layers, space.num_layers),
                     teacher_heads=tuple(int(h) for h in space.largest().heads))
  sampler = Sampler(space, strategy, cfg.train.num_random, cfg.train.ramp_steps)
  slices = dense_slices(cfg, sampler, dynamic=False) if dense_static else ()
  step = jax.jit(make_train_step(graphdef, proj_graphdef, sampler, tx, spec, 1,
                                 unroll_subnets=unroll_subnets, slices=slices), donate_argnums=0)
  all_params = nnx.State({'model': params, 'proj': proj_params})
  state = TrainState(step=jnp.int32(0), params=all_params, opt_state=tx.init(all_params),
                     rng=jax.random.key_data(jax.random.key(0)))
  return step, state, sampler.k


def dense_step(cfg, space):
  """A standalone dense model's AdamW step: the exported largest arch, no masks."""
  dense = export.export(init_supernet(cfg, space), space.cfg, space.largest())
  graphdef, params = nnx.split(dense, nnx.Param)
  tx, _ = make_optimizer(cfg.train)

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params)(evaluation.model_inputs(batch))
    total, n = token_cross_entropy(logits, batch['targets'], batch['weights'])
    return total / n

  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return jax.jit(step, donate_argnums=0), (params, tx.init(params))


def quickstart_train_tokens_per_second(cfg, steps: int = 12) -> float:
  """Tokens/s the quickstart's real (sandwich) training step consumes (bench_data's yardstick)."""
  space = build_space(cfg)
  batches = batches_of(cfg, steps)
  step, state, _ = masked_step(cfg, space, cfg.train.sampling,
                               dense_static=cfg.train.dense_static_archs)
  seconds, _, _ = time_steps(step, state, batches)
  return cfg.data.batch_size * cfg.data.seq_len / seconds


def batches_of(cfg, n):
  it = data.train_iterator(cfg.data)
  keep = evaluation.MODEL_INPUTS + ('targets', 'weights')
  return [{k: jnp.asarray(v) for k, v in next(it).items() if k in keep} for _ in range(n)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='fewer timed steps')
  args = parser.parse_args()
  steps = 6 if args.quick else 20
  cfg = quickstart_config()
  space = build_space(cfg)
  batches = batches_of(cfg, steps)
  tokens = cfg.data.batch_size * cfg.data.seq_len

  d_step, d_state = dense_step(cfg, space)
  dense_s, dense_first, _ = time_steps(d_step, d_state, batches)
  m_step, m_state, _ = masked_step(cfg, space, 'standard')
  masked_s, masked_first, _ = time_steps(m_step, m_state, batches)
  scanned = quickstart_config()
  scanned.model.scan_layers = True
  c_step, c_state, _ = masked_step(scanned, build_space(scanned), 'standard')
  scanned_s, scanned_first, _ = time_steps(c_step, c_state, batches)
  s_step, s_state, k = masked_step(cfg, space, 'sandwich', dense_static=True)
  sandwich_s, sandwich_first, _ = time_steps(s_step, s_state, batches)
  a_step, a_state, _ = masked_step(cfg, space, 'sandwich')
  all_masked_s, all_masked_first, _ = time_steps(a_step, a_state, batches)
  l_step, l_state, _ = masked_step(cfg, space, 'sandwich', unroll_subnets=False,
                                   dense_static=True)
  looped_s, looped_first, _ = time_steps(l_step, l_state, batches)

  flops = 3 * float(space.cost(space.largest())['flops_per_token']) * tokens
  device = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_FLOPS.items() if k in device), None)
  results = {
      'masked_over_dense': round(masked_s / dense_s, 3),
      'masked_scanned_over_dense': round(scanned_s / dense_s, 3),
      'sandwich_over_dense': round(sandwich_s / dense_s, 3),
      'sliced_speedup': round(all_masked_s / sandwich_s, 3),
      'looped_over_unrolled': round(looped_s / sandwich_s, 3),
      'dense_step_seconds': dense_s, 'masked_step_seconds': masked_s,
      'masked_scanned_step_seconds': scanned_s,
      'sandwich_step_seconds': sandwich_s, 'looped_sandwich_step_seconds': looped_s,
      'all_masked_sandwich_step_seconds': all_masked_s,
      'first_call_seconds': {'dense': dense_first, 'masked': masked_first,
                             'masked_scanned': scanned_first,
                             'sandwich': sandwich_first, 'sandwich_looped': looped_first,
                             'sandwich_all_masked': all_masked_first},
      'sandwich_archs_per_step': k,
      'tokens_per_step': tokens,
      'dense_tokens_per_s': tokens / dense_s, 'masked_tokens_per_s': tokens / masked_s,
      'sandwich_tokens_per_s': tokens / sandwich_s,
      'largest_params': int(space.cost(space.largest())['params']),
      'mfu_dense': flops / dense_s / peak if peak else None,
      'mfu_masked': flops / masked_s / peak if peak else None,
  }
  table_row = lambda name, s, first: (name, f'{s * 1e3:.1f}', f'{tokens / s:,.0f}',
                                f'{s / dense_s:.2f}', f'{first:.1f}')
  rows = [table_row('dense (exported largest)', dense_s, dense_first),
          table_row('masked supernet, largest (layers unrolled: the quickstart config)', masked_s,
                    masked_first),
          table_row('masked supernet, largest, layers in a lax.scan (model.scan_layers=True)',
                    scanned_s, scanned_first),
          table_row(f'sandwich ({k} archs, in-place KD), sub-networks unrolled, largest and '
                    'smallest as dense slices (the default)', sandwich_s, sandwich_first),
          table_row(f'sandwich ({k} archs), all masked (train.dense_static_archs=False)',
                    all_masked_s, all_masked_first),
          table_row(f'sandwich ({k} archs), dense slices, masked sub-networks in a lax.scan',
                    looped_s, looped_first)]
  notes = (f'Quickstart model ({results["largest_params"]:,} parameters at its largest), '
           f'{cfg.data.batch_size} x {cfg.data.seq_len} tokens per step, float32, median of '
           f'{steps - 2} steps after 2 warm-up steps.')
  write_results('bench_train', results, rows,
                ('step', 'ms / step', 'tokens / s', 'x dense', 'first call s (compile)'),
                notes, quick=args.quick)
  print(notes)
  for row in rows:
    print(row)


if __name__ == '__main__':
  np.set_printoptions(precision=3)
  main()
