"""Zero-cost proxy ranking benchmark: does a proxy at initialisation rank trained architectures?

Samples distinct architectures of a small elastic space (transformer, bottleneck and skip blocks),
trains every one standalone from the supernet's initial weights for the same fixed budget on
tiny-shakespeare (byte tokens; a causal LM, and a masked LM with an encoder), and records its final
validation loss. Every proxy is computed at that same initialisation, on the first training
minibatches. Reports, per task, Kendall tau and Spearman rho of each proxy against the NEGATIVE
final validation loss (proxies are oriented higher = better, so a useful proxy has tau > 0), and
each proxy's time per 1000 architectures (compilation excluded, all archs in one call), all in one
run.

Proxy minibatches: 3 of 64 sequences x 64 tokens (4096 tokens each; the W-PCA paper scores 3
minibatches of 128-token sequences). Timings run XLA single-threaded (see XLA_FLAGS below).

Training: each arch has its own copy of the supernet's parameters and trains through the masked
supernet (the gradient of the masked model is exactly the sub-network's), AdamW with warmup and
cosine decay, the same minibatch sequence for every arch. One jitted program trains every arch:
`lax.map` over archs (chunk 1 = one arch at a time, so removed layers and FFN blocks are skipped,
best on CPU; chunk > 1 vmaps that many archs, best on GPU), `lax.scan` over steps.

  python bench/bench_proxies.py --quick     # CI: 12 archs x 40 steps, causal LM only
  python bench/bench_proxies.py             # full: 48 archs x 300 steps, causal LM and MLM
  python bench/bench_proxies.py --save_data D / --data D   # build batches here, run elsewhere
"""

from __future__ import annotations

import os

# On a shared CPU, threads that spin-wait for each other make timings erratic: LAPACK's eigensolver
# (OpenBLAS threads, used by W-PCA and synaptic diversity) ran 1x to 30x slower from one identical
# call to the next, and XLA's multi-threaded kernels stall likewise. Single-threaded runs time
# every proxy in the same, stable regime (and train as fast on 2 busy cores). Set these yourself
# to override.
os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false')
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import timed, write_results
from flax import nnx
from scipy import stats

from elastic_jax import arch as arch_lib
from elastic_jax import proxies
from elastic_jax.config import ModelConfig, space_config
from elastic_jax.losses import token_cross_entropy
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

SHAKESPEARE = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'tinyshakespeare'
VOCAB = 262  # elastic_jax.data's byte tokenizer: 256 bytes + 6 special tokens
SEQ_LEN = 64
MODELS = {
    'clm': ModelConfig(kind='decoder', vocab_size=VOCAB, max_len=SEQ_LEN, positions='learned',
                       norm='layernorm', norm_placement='pre', mlp='gelu'),
    'mlm': ModelConfig(kind='encoder', vocab_size=VOCAB, max_len=SEQ_LEN, positions='learned',
                       norm='layernorm', norm_placement='post', mlp='gelu', output_bias=True),
}
# A small W-PCA-like space: per layer a BERT block or a MobileBERT bottleneck block (or skip),
# elastic FFN width, heads and bottleneck inner width; global hidden size and depth.
SPACE = dict(num_layers=4, hidden=[64, 96, 128], depth=[2, 3, 4],
             blocks=['transformer', 'bottleneck', 'skip'], heads=[2, 4], head_dim=[16],
             ffn=[64, 128, 192, 256], inner=[32, 64], bottleneck_head_dim=16)


def data_config(task: str, batch_size: int, eval_batches: int):
  from elastic_jax import data  # noqa: PLC0415 (only where the batches are built)
  c = data.default_config()
  c.source = 'text_files'
  c.paths = [str(SHAKESPEARE / 'input.txt')]
  c.doc_boundary = 'blank_line'  # speeches
  c.tokenizer = 'bytes'
  c.task = 'causal_lm' if task == 'clm' else 'mlm'
  c.seq_len = SEQ_LEN
  c.batch_size = batch_size
  c.eval_batches = eval_batches
  c.seed = 0
  return c


def build_batches(task: str, steps: int, batch_size: int, eval_batches: int,
                  proxy_batch_size: int) -> dict:
  """{'train': [S, B, T], 'val': [V, B, T], 'proxy': [3, B', T] arrays} from elastic_jax.data.

  The proxies read the first 3 minibatches of the training stream at `proxy_batch_size`."""
  from elastic_jax import data  # noqa: PLC0415
  cfg = data_config(task, batch_size, eval_batches)
  it = data.train_iterator(cfg)
  train = [next(it) for _ in range(steps)]
  val = data.eval_batches(cfg)
  it = data.train_iterator(data_config(task, proxy_batch_size, eval_batches))
  proxy = [next(it) for _ in range(3)]
  keys = ('tokens', 'targets', 'weights', 'segment_ids', 'positions')
  stack = lambda bs: {k: np.stack([np.asarray(b[k]) for b in bs]) for k in keys}
  return {'train': stack(train), 'val': stack(val), 'proxy': stack(proxy)}


def sample_archs(space: Space, n: int, seed: int):
  """n distinct archs, uniform per gene (duplicates and archs without any layer redrawn)."""
  genomes = np.asarray(space.random_genomes(jax.random.key(seed), 8 * n))
  archs = jax.vmap(space.decode)(jnp.asarray(genomes))
  layers = np.asarray(jax.vmap(lambda a: jnp.sum(a.layer_on()))(archs))
  seen, keep = set(), []
  for i in range(len(genomes)):
    key = arch_lib.dumps(jax.tree.map(lambda x, i=i: x[i], archs))
    if layers[i] > 0 and key not in seen:
      seen.add(key)
      keep.append(i)
    if len(keep) == n:
      break
  return jax.tree.map(lambda x: x[np.asarray(keep)], archs)


def make_trainer(graphdef, steps: int, lr: float, chunk: int):
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps, lr * 0.1)
  decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b2=0.99, weight_decay=0.01, mask=decay))

  def mean_loss(params, arch, batch):
    model = nnx.merge(graphdef, params)
    inputs = {k: batch[k] for k in ('tokens', 'positions', 'segment_ids')}
    total, weight = token_cross_entropy(model(inputs, arch), batch['targets'], batch['weights'])
    return total / jnp.maximum(weight, 1.0), (total, weight)

  @jax.jit
  def train_population(state, archs, train, val):
    def one(arch):
      def step(carry, batch):
        params, opt = carry
        (loss, _), grads = jax.value_and_grad(mean_loss, has_aux=True)(params, arch, batch)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss
      (params, _), losses = jax.lax.scan(step, (state, tx.init(state)), train)

      def evaluate(sums, batch):
        _, (total, weight) = mean_loss(params, arch, batch)
        return sums + jnp.stack([total, weight]), None
      sums, _ = jax.lax.scan(evaluate, jnp.zeros(2), val)
      return sums[0] / sums[1], jnp.mean(losses[-10:])
    return jax.lax.map(one, archs, batch_size=chunk if chunk > 1 else None)

  return train_population


def correlations(scores: dict, loss: np.ndarray) -> tuple[dict, dict]:
  """Kendall tau and Spearman rho of each proxy against -loss (NaN scores left out)."""
  tau, rho = {}, {}
  for name, s in scores.items():
    s = np.asarray(s, np.float64)
    ok = ~np.isnan(s)
    tau[name] = float(stats.kendalltau(s[ok], -loss[ok]).statistic)
    rho[name] = float(stats.spearmanr(s[ok], -loss[ok]).statistic)
  return tau, rho


def run_task(task: str, batches: dict, archs, args) -> dict:
  cfg = MODELS[task]
  space = Space(cfg, space_config(SPACE), seq_len=SEQ_LEN)
  model = Model(cfg, space.cfg.supernet_dims(), rngs=nnx.Rngs(args.seed))
  graphdef, state = nnx.split(model)
  n = archs.hidden.shape[0]
  proxy_batches = [{k: v[i] for k, v in batches['proxy'].items()} for i in range(3)]
  proxy_cfg = proxies.proxy_config({'chunk': args.chunk})

  # Each timing group in one call: a first call compiles, then --repeats timed rounds that visit
  # every group in turn (round-robin, so a burst of load from other jobs on a shared machine hits
  # all proxies alike); each group keeps its fastest call, since other jobs only ever add time.
  # Full runs time every proxy alone; --quick times the three proxies that need exactly the same
  # loss gradient (snip, grad_norm, synaptic_saliency) in one call and charges each the call.
  groups = [(p,) for p in proxies.PROXIES]
  if args.quick:
    shared = ('snip', 'grad_norm', 'synaptic_saliency')
    groups = [g for g in groups if g[0] not in shared] + [shared]
  runs = {g: (lambda g=g: proxies.score_archs(model, space, archs, proxy_batches, proxy_cfg,
                                              names=g)) for g in groups}
  scores, seconds, compile_s = {}, {}, {}
  for group, run in runs.items():
    out, compile_s[group] = timed(run)
    for name in group:
      scores[name] = out[name]
  best = {g: float('inf') for g in groups}
  for _ in range(args.repeats):
    for group, run in runs.items():
      best[group] = min(best[group], timed(run)[1])
  for group in groups:
    for name in group:
      seconds[name] = best[group]
    print(f'  [{task}] {"+".join(group):20s} compile+run {compile_s[group]:7.1f}s  run '
          f'{best[group]:7.2f}s ({1000 * best[group] / n:8.1f} s / 1000 archs)', flush=True)

  trainer = make_trainer(graphdef, args.steps, args.lr, args.chunk)
  train = {k: jnp.asarray(v[:args.steps]) for k, v in batches['train'].items()}
  val = {k: jnp.asarray(v) for k, v in batches['val'].items()}
  (val_loss, train_loss), train_s = timed(trainer, state, archs, train, val)
  val_loss, train_loss = np.asarray(val_loss, np.float64), np.asarray(train_loss, np.float64)
  print(f'  [{task}] trained {n} archs x {args.steps} steps in {train_s:.0f}s; validation loss '
        f'{val_loss.min():.3f} .. {val_loss.max():.3f}', flush=True)
  tau, rho = correlations(scores, val_loss)
  # SynFlow reads no data (all-ones inputs; one token and one forward-mode JVP since 314faa6):
  # the cost claim is against the gradient proxies that back-propagate through the minibatches.
  cheapest = min((p for p in proxies.GRADIENT_PROXIES if p != 'synflow'), key=seconds.get)
  return {
      'kendall_tau': tau,
      'spearman_rho': rho,
      'seconds_per_1000': {p: 1000 * s / n for p, s in seconds.items()},
      'wpca_time_over_cheapest_gradient_proxy': seconds['wpca'] / seconds[cheapest],
      'cheapest_gradient_proxy': cheapest,
      'wpca_time_over_synflow': seconds['wpca'] / seconds['synflow'],
      'train_seconds': train_s,
      'val_loss': val_loss.tolist(),
      'train_loss_last10': train_loss.tolist(),
      'scores': {p: np.asarray(s, np.float64).tolist() for p, s in scores.items()},
      'params_range': [float(scores['params'].min()), float(scores['params'].max())],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='CI mode: fewer archs and steps')
  parser.add_argument('--archs', type=int, default=None, help='architectures (>= 40 full)')
  parser.add_argument('--steps', type=int, default=None, help='training steps per arch')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--eval_batches', type=int, default=8)
  parser.add_argument('--proxy_batch_size', type=int, default=64)
  parser.add_argument('--lr', type=float, default=2e-3)
  parser.add_argument('--chunk', type=int, default=1, help='archs vmapped together')
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed rounds, fastest kept (default 3 quick, 5 full)')
  parser.add_argument('--tasks', default=None, help="comma list of 'clm', 'mlm'")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--save_data', default=None, help='write the batches here and exit')
  parser.add_argument('--data', default=None, help='read batches written by --save_data')
  args = parser.parse_args()
  n = args.archs or (12 if args.quick else 48)
  args.repeats = args.repeats or (3 if args.quick else 5)
  args.steps = args.steps or (40 if args.quick else 300)
  tasks = (args.tasks or ('clm' if args.quick else 'clm,mlm')).split(',')

  start = time.perf_counter()
  data = {}
  for task in tasks:
    if args.data:
      with np.load(Path(args.data) / f'{task}.npz') as f:
        data[task] = {part: {k[len(part) + 1:]: f[k] for k in f if k.startswith(part + '.')}
                      for part in ('train', 'val', 'proxy')}
    else:
      data[task] = build_batches(task, args.steps, args.batch_size, args.eval_batches,
                                 args.proxy_batch_size)
    if args.save_data:
      Path(args.save_data).mkdir(parents=True, exist_ok=True)
      np.savez(Path(args.save_data) / f'{task}.npz',
               **{f'{part}.{k}': v for part, d in data[task].items() for k, v in d.items()})
  if args.save_data:
    print(f'wrote {tasks} batches to {args.save_data}')
    return

  space = Space(MODELS['clm'], space_config(SPACE), seq_len=SEQ_LEN)
  archs = sample_archs(space, n, args.seed)
  print(f'{n} distinct archs; {args.steps} steps of {args.batch_size} x {SEQ_LEN} tokens; '
        f'device {jax.devices()[0].device_kind}', flush=True)
  per_task = {task: run_task(task, data[task], archs, args) for task in tasks}

  main_task = tasks[0]
  head = per_task[main_task]
  results = {
      'kendall_tau': head['kendall_tau'],
      'spearman_rho': head['spearman_rho'],
      'seconds_per_1000': head['seconds_per_1000'],
      'task': main_task,
      **{t: per_task[t] for t in tasks if t != main_task},
      'details': {main_task: {k: v for k, v in head.items()
                              if k not in ('kendall_tau', 'spearman_rho', 'seconds_per_1000')}},
      'archs': n, 'steps': args.steps, 'batch_size': args.batch_size, 'seq_len': SEQ_LEN,
      'lr': args.lr, 'chunk': args.chunk, 'space': SPACE,
      'proxy_batches': f'3 x {args.proxy_batch_size} x {SEQ_LEN}',
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'openblas_num_threads': os.environ.get('OPENBLAS_NUM_THREADS', ''),
      'arch_json': [arch_lib.to_json(a) for a in arch_lib.unstack(archs)],
      'wall_seconds': time.perf_counter() - start,
      'orientation': 'every proxy is higher = predicted better; correlated with -validation loss',
  }
  header = ('proxy',) + sum(((f'tau {t}', f'rho {t}', f's/1000 archs {t}') for t in tasks), ())
  rows = []
  for p in proxies.PROXIES:
    row = [p]
    for t in tasks:
      r = per_task[t]
      row += [f"{r['kendall_tau'][p]:+.3f}", f"{r['spearman_rho'][p]:+.3f}",
              f"{r['seconds_per_1000'][p]:.1f}"]
    rows.append(tuple(row))
  lines = []
  for t in tasks:
    r = per_task[t]
    tau = r['kendall_tau']
    baselines = {p: v for p, v in tau.items() if p not in ('wpca', 'vpca')}
    best = max(baselines, key=baselines.get)
    ratio = r['wpca_time_over_cheapest_gradient_proxy']
    lines.append(
        f"**{t}**: W-PCA tau {tau['wpca']:+.3f} vs parameter count {tau['params']:+.3f} "
        f"(V-PCA {tau['vpca']:+.3f}); best baseline {best} {tau[best]:+.3f}. W-PCA "
        f"{'beats' if tau['wpca'] > tau[best] else 'does not beat'} every baseline and "
        f"{'beats' if tau['wpca'] > tau['params'] else 'does not beat'} parameter count alone. "
        f"W-PCA time / cheapest gradient proxy that reads the data ({r['cheapest_gradient_proxy']})"
        f" = {ratio:.2f} ({'meets' if ratio <= 0.5 else 'misses'} the <= 0.5 target); "
        f"W-PCA time / SynFlow (data-free) = {r['wpca_time_over_synflow']:.2f}. Validation loss "
        f"{min(r['val_loss']):.3f} .. {max(r['val_loss']):.3f}.")
  notes = (f"{n} distinct archs of a {SPACE['num_layers']}-layer space "
           f"(params {head['params_range'][0]:,.0f} .. {head['params_range'][1]:,.0f}), each "
           f"trained {args.steps} steps x {args.batch_size} x {SEQ_LEN} tokens on tiny-shakespeare "
           f"bytes from the supernet's initialisation; proxies at that initialisation on 3 "
           f"training minibatches of {args.proxy_batch_size} x {SEQ_LEN} tokens. tau / rho: "
           f"against -validation loss (higher = better for every proxy). s/1000 archs: fastest "
           f"of {args.repeats} round-robin calls over all archs, compile excluded, device "
           f"{jax.devices()[0].device_kind}, XLA_FLAGS '{os.environ.get('XLA_FLAGS', '')}', "
           f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '')}."
           '\n\n' + '\n\n'.join(lines))
  path = write_results('bench_proxies', results, rows, header, notes, quick=args.quick)
  print(notes)
  print(f'wrote {path}')
  print(json.dumps({'kendall_tau': results['kendall_tau']}, indent=1))


if __name__ == '__main__':
  main()
