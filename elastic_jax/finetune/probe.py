"""LP-FT's linear probe: a GLUE head fitted on the frozen backbone's features before fine-tuning.

Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution"
(ICLR 2022): fine-tuning everything from a random head first pushes that head's meaningless
gradients into the backbone; fitting the head alone first (linear probing), then fine-tuning all
(LP-FT), keeps the features the head starts from. Here the probe minimises the job's own training
loss (cross-entropy or squared error to the labels, or the distillation loss to a teacher's
outputs when one is given) over the head's kernel and bias with L-BFGS (`optax.lbfgs`, full
batch: one [N, D] matrix of pooled features), plus an L2 penalty on the kernel. So for squared
error it is ridge regression and for cross-entropy multinomial logistic regression (tested
against scikit-learn).

- The penalty acts on the kernel of the features divided by one common scale (their
  root-mean-square deviation), not per feature: standardising each feature lets near-constant
  ones (a tanh pooler's, a compressed model's collapsed channels) take huge weights that blow up
  once the backbone moves, while a raw-feature penalty means something else for a model whose
  features are 100x smaller (a compressed one's are).
- Several candidate penalties: the one of least held-out loss in k-fold cross-validation on the
  training split (as scikit-learn's RidgeCV / LogisticRegressionCV choose); the development
  split is never read.
- Measured (bench_glue's STS-B recipe: 1,000 training examples x 3 epochs, lr 1e-4, BERT's pooler;
  one run each, dev Pearson/Spearman mean x 100): all-MiniLM-L6-v2 54.5 from a random head ->
  68.1 from the probed one (cross-validation chose 0.1); its compressed 50% sub-network -11.2 ->
  31.6 (chose 1e-3; on its collapsed features the random head's fine-tuning never left the
  labels' mean). A penalty on standardised features (scikit-learn's RidgeCV) gave 23.7 there,
  its first epoch's training loss 120.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elastic_jax.errors import UserError

MAX_ITERATIONS = 500
TOLERANCE = 1e-6  # stop when the gradient's norm falls below this


def fit_head(features_ND: np.ndarray, labels_N: np.ndarray, teacher_NL: np.ndarray | None,
             num_outputs: int, loss_fn: Callable, l2: float | Sequence[float], folds: int = 5
             ) -> tuple[np.ndarray, np.ndarray, float]:
  """(kernel [D, L], bias [L], the penalty used) minimising mean `loss_fn(outputs [N, L], batch,
  teacher)` + penalty * ||kernel'||^2 over the rows, outputs = features @ kernel + bias, kernel'
  the kernel of the features divided by their common scale; `batch` holds 'label' and 'weight'.
  `l2`: one penalty, or candidates chosen by `folds`-fold cross-validation. Deterministic."""
  candidates = tuple(float(v) for v in np.atleast_1d(l2))
  n = len(labels_N)
  if not candidates or min(candidates) < 0:
    raise UserError(f'finetune.probe_l2={l2!r}: give one penalty >= 0 or several candidates')
  if len(candidates) > 1 and not 2 <= folds <= n:
    raise UserError(f'finetune.probe_folds={folds}: cross-validating {len(candidates)} '
                    f'penalties needs 2 <= folds <= the {n} training rows')
  x = np.asarray(features_ND, np.float64)
  mean_D = x.mean(axis=0)  # centred for the solver's conditioning; folded into the bias after
  scale = float(np.sqrt(np.mean(np.square(x - mean_D)))) or 1.0
  x_ND = jnp.asarray((x - mean_D) / scale, jnp.float32)
  label_N = jnp.asarray(labels_N)
  teacher = None if teacher_NL is None else jnp.asarray(teacher_NL, jnp.float32)

  def loss(p, weight_N):
    return loss_fn(x_ND @ p['kernel'] + p['bias'], {'label': label_N, 'weight': weight_N},
                   teacher)

  @jax.jit
  def solve(weight_N, penalty):
    objective = lambda p: loss(p, weight_N) + penalty * jnp.sum(jnp.square(p['kernel']))
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
      p, state, i = carry
      value, grad = value_and_grad(p, state=state)
      updates, state = solver.update(grad, state, p, value=value, grad=grad,
                                     value_fn=objective)
      return optax.apply_updates(p, updates), state, i + 1

    def running(carry):
      _, state, i = carry
      grad = optax.tree.get(state, 'grad')
      return (i == 0) | ((i < MAX_ITERATIONS) & (optax.tree.norm(grad) >= TOLERANCE))

    start = {'kernel': jnp.zeros((x_ND.shape[1], num_outputs), jnp.float32),
             'bias': jnp.zeros((num_outputs,), jnp.float32)}
    return jax.lax.while_loop(running, step, (start, solver.init(start), 0))[0]

  penalty = candidates[0]
  if len(candidates) > 1:
    fold_N = np.random.default_rng(0).permutation(n) % folds
    held_out = jax.jit(loss)
    cv = [np.mean([float(held_out(solve(jnp.asarray(fold_N != f, jnp.float32), c),
                                  jnp.asarray(fold_N == f, jnp.float32)))
                   for f in range(folds)]) for c in candidates]
    penalty = candidates[int(np.argmin(cv))]
  fitted = jax.device_get(solve(jnp.ones(n, jnp.float32), penalty))
  kernel = np.asarray(fitted['kernel'], np.float64) / scale
  bias = np.asarray(fitted['bias'], np.float64) - mean_D @ kernel
  return kernel.astype(np.float32), bias.astype(np.float32), penalty
