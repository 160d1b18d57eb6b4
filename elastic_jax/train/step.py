"""One training step: sample K sub-networks, distil, accumulate gradients, update.

Pure and jittable: the state (params, optimizer state, step, RNG) goes in and comes out; archs
are sampled inside from (seed, step); the K sub-networks run in a `lax.scan` (one trace for any K
and any archs); micro-batches (gradient accumulation) run in another scan.

The objective of a step is the sum over its K sub-networks of each one's loss (weighted
cross-entropy plus distillation terms). Every token-level term is a mean over the tokens of the
whole global batch: each micro-batch adds its token sums divided by the global batch's token
count (counted once, over all micro-batches, devices and processes: the step sees the global
batch), so how the batch is split into micro-batches or over devices changes neither the loss
nor the gradient, even when micro-batches hold different numbers of tokens (masked LM, padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from elastic_jax import losses, parallel
from elastic_jax.accumulate import scan_map, scan_sum
from elastic_jax.evaluation import model_inputs
from elastic_jax.train import distill


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # {'model': supernet params, 'proj': distillation projections}
  opt_state: optax.OptState
  rng: jax.Array  # raw key data (uint32), checkpointable


def abstract_state(params, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """Shapes, dtypes and shardings of the training state of `params` (shapes; no arrays): each
  leaf a `jax.ShapeDtypeStruct` carrying its sharding from `shardings` (whose leaves stand for
  whole NNX variables: one array each, in the same order)."""
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(tx.init, params),
                      rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))
  return parallel.with_shardings(shapes, shardings)


def state_shardings(tx: optax.GradientTransformation, params, param_shardings,
                    mesh: jax.sharding.Mesh) -> TrainState:
  """Shardings of the training state of `params` (shapes): the parameters as `param_shardings`,
  each optimizer moment like its parameter, the step, counts and rng replicated."""
  replicated = parallel.replicated(mesh)
  return TrainState(step=replicated, params=param_shardings, rng=replicated,
                    opt_state=parallel.opt_state_shardings(tx, params, param_shardings, mesh))


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """Static description of the distillation of one run."""

  weights: dict  # ce, logits_kl, hidden_mse, attn_kl, block_preserving
  temperature: float
  in_place: bool  # archs[0] (the largest) teaches the others
  layer_map: tuple[int, ...]
  teacher_heads: tuple[int, ...]  # active heads of each teacher layer (attention KL)
  start_step: int = 0  # distillation terms off before this step ...
  ramp_steps: int = 0  # ... then ramped in linearly over these

  def scale(self, step) -> jax.Array | None:
    """The distillation terms' weight at `step` (a traced int), or None where it is always 1."""
    if not (self.start_step or self.ramp_steps):
      return None
    done = (step - self.start_step + 1).astype(jnp.float32) / max(self.ramp_steps, 1)
    return jnp.clip(done, 0.0, 1.0)

  @property
  def captures(self) -> tuple[str, ...]:
    names = []
    for loss in distill.FEATURE_LOSSES:
      if self.weights.get(loss, 0.0):
        names += [n for n in distill.NEEDS[loss] if n not in names]
    return tuple(names)


def valid_tokens(batch) -> jax.Array:
  seg = batch.get('segment_ids')
  return (jnp.ones(batch['tokens'].shape, jnp.float32) if seg is None
          else (seg > 0).astype(jnp.float32))


def token_totals(batch) -> dict:
  """The token counts that normalise a step's losses: the CE weight total and the number of valid
  tokens, of the whole (global) batch."""
  return {'weights': jnp.maximum(jnp.sum(batch['weights'].astype(jnp.float32)), 1.0),
          'valid': jnp.maximum(jnp.sum(valid_tokens(batch)), 1.0)}


def feature_loss(feats, batch, arch, teacher, spec: DistillSpec, projections,
                 totals: dict | None = None):
  """One student's weighted feature-distillation terms (hidden MSE, attention KL, ELM's
  block-preserving loss) against the teacher's features, as this batch's share of the global
  batch's means (`totals`: `token_totals` of the global batch; default: of `batch` itself).
  The vocabulary terms (cross-entropy, logits KL) are `losses.vocab_losses`'."""
  totals = token_totals(batch) if totals is None else totals
  w = spec.weights
  valid = valid_tokens(batch)
  # The feature losses are means over this batch's valid tokens: weighted by its share of the
  # global batch's valid tokens, they add up to the global mean.
  share = jnp.sum(valid) / totals['valid']
  loss = jnp.zeros((), jnp.float32)
  on = arch.layer_on().astype(jnp.float32)
  layers = arch.block.shape[-1]
  per_layer = lambda terms: jnp.sum(on * jnp.stack(terms)) / jnp.maximum(jnp.sum(on), 1.0)
  if w['hidden_mse']:
    terms = [losses.hidden_mse(projections('hidden', i, feats['hidden'][i]),
                                teacher['hidden'][spec.layer_map[i]], valid)
             for i in range(layers)]
    loss = loss + w['hidden_mse'] * per_layer(terms)
  if w['attn_kl']:
    terms = [losses.attention_kl(feats['attn_probs'][i], teacher['attn_probs'][spec.layer_map[i]],
                                  arch.heads[i], spec.teacher_heads[spec.layer_map[i]], valid)
             for i in range(layers)]
    loss = loss + w['attn_kl'] * per_layer(terms)
  if w['block_preserving']:
    bp = lambda name, i, j: losses.block_preserving(projections(name, i, feats[name][i]),
                                                     teacher[name][j], valid)
    embed = losses.block_preserving(projections('embed', 0, feats['embed']), teacher['embed'],
                                     valid)
    terms = [bp('attn_out', i, spec.layer_map[i]) + bp('ffn_out', i, spec.layer_map[i])
             for i in range(layers)]
    loss = loss + w['block_preserving'] * (embed + per_layer(terms))
  return share * loss


def teacher_targets(x_BTE, feats, project=None) -> dict:
  """Stop-gradient teacher targets: the features stacked per layer (padded to one width) and, for
  an external teacher, its pre-logit states `pre_logits` with its vocabulary projection `project`
  (the logits are formed chunk by chunk beside the students', `losses.vocab_losses`; give a
  `project` whose parameters are stop-gradient too)."""
  out = {'pre_logits': jax.lax.stop_gradient(x_BTE), 'project': project}
  for name, value in feats.items():
    if isinstance(value, list):
      width = max(v.shape[-1] for v in value)
      value = jnp.stack([jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, width - v.shape[-1])])
                         for v in value])
    out[name] = jax.lax.stop_gradient(value)
  return out


def masked_layout(feats: dict, like: dict, source) -> dict:
  """A dense sub-network's captured features laid out as the masked supernet gives them
  (`like`: their shapes; `feats` must hold 'embed' where 'hidden' is asked for): every array
  zero-padded at the end of each axis to the masked shape (inactive channels, heads and widths
  are zeros there too), per-layer lists indexed by supernet layer (dense layer j is supernet
  layer `source[j]`). A layer the sub-network skips is the identity there: its output
  ('hidden') is its input, its block features zeros."""
  def pad(x, want):
    return jnp.pad(x.astype(want.dtype), [(0, n - m) for n, m in zip(want.shape, x.shape)])

  out = {}
  for name, want in like.items():
    got = feats[name]
    if not isinstance(want, list):
      out[name] = pad(got, want)
      continue
    at = dict(zip(source, got, strict=True))
    carried = feats['embed'] if name == 'hidden' else None
    out[name] = []
    for layer, v in enumerate(want):
      if layer in at:
        carried = at[layer] if name == 'hidden' else None
        out[name].append(pad(at[layer], v))
      else:
        out[name].append(jnp.zeros(v.shape, v.dtype) if carried is None else pad(carried, v))
  return out


def split_microbatches(batch, grad_accum: int, sharding=None):
  """[B, ...] -> [grad_accum, B // grad_accum, ...], micro-batch i = rows i, i + grad_accum, ...

  Strided, not contiguous: the batch is split over the devices in contiguous blocks, so every
  micro-batch takes rows from every device's block and spans all devices (a contiguous split
  would put each micro-batch on 1 / grad_accum of them). `sharding` (the micro-batches' sharding,
  the batch axis second) pins that layout.
  """
  def split(x):
    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
  return jax.tree.map(split, batch)


def make_loss_fn(graphdef, proj_graphdef, spec: DistillSpec,
                 external_teacher: Callable | None = None, *, logits_chunk: int = 0,
                 unroll_subnets: bool = True, unroll_inner: bool = False,
                 gather: Callable | None = None, slices: tuple[Callable, ...] = ()):
  """loss(params, batch, archs, teacher_params, totals) -> (total, (loss_per_arch, ce_per_arch)):
  the summed loss of the K sub-networks `archs` on one micro-batch, normalised by the global
  batch's `totals` (`token_totals`; its optional 'distill' entry scales every distillation term:
  `DistillSpec.scale`). Differentiate it with respect to `params` only: the teacher
  (the first arch in-place, or `teacher_params`) enters through stop-gradient targets.

  The first sub-network runs, then the other K - 1, unrolled (`unroll_subnets`, train's
  default: XLA fuses across them) or in a `lax.scan` (one copy of the model in the program); the
  teacher's log-probabilities are computed once and read by every student, and all K read their
  token vectors from one lookup of the supernet's table (one scatter-add into it in the backward
  pass, not K). `logits_chunk` = 0:
  each sub-network's logits are formed with its trunk. `logits_chunk` > 0: only the pre-logit
  states are kept, and every sub-network's cross-entropy and logits KL are computed afterwards,
  `logits_chunk` positions at a time (`losses.vocab_losses`; its students unrolled or looped
  alike).

  `unroll_inner`: every loop here traced unrolled (the sub-networks and the vocabulary chunks),
  for XLA's cost analysis (aot.py's counting twin): it counts a loop body once, and a body that
  carries what unrolled code fuses away (the parameters' gradient accumulated through the loop's
  carry, the residuals stacked for the backward pass) weighs more than an unrolled iteration:
  x K / 2 of the looped count was ~40% above the unrolled program's bytes on a 2-layer
  GPT-2-medium-width step.

  `gather`: applied to the model's parameters before use (`parallel.gather_fn`: FSDP-sharded
  parameters gathered once per micro-batch for all K sub-networks, their gradients
  reduce-scattered back), or None.

  `slices`: for the first len(slices) sub-networks, the archs every step trains (the sandwich's
  largest and smallest, a fixed arch, anchors: `Sampler.static_archs`), the `export.Slicer` of
  that sub-network's dense model (its arrays slices of the supernet's, so the gradient flows
  back into them). Those sub-networks then run at their own sizes, without masks: the same
  function of the parameters (masked == exported), at the cost of the dense model; their
  captured features are laid out as the masked supernet's (`masked_layout`). Not with SCONE (an
  export reads precomputed f-gram rows).
  """
  capture = spec.captures
  w = spec.weights

  def loss_fn(params, batch, archs, teacher_params, totals):
    model = nnx.merge(graphdef, params['model'] if gather is None else gather(params['model']))
    projections = nnx.merge(proj_graphdef, params['proj'])
    inputs = model_inputs(batch)
    # Where the vocabulary is read: every position, or a masked-LM batch's predicted ones.
    take, targets, weights = losses.at_predictions(batch)
    teacher = (None if external_teacher is None
               else external_teacher(teacher_params, inputs, capture))
    if jax.tree.leaves(archs)[0].shape[0] > 1:
      # One token lookup for the K sub-networks (each reads its hidden prefix), so the backward
      # pass scatters their summed cotangents into the table once, not K times.
      inputs = {**inputs, 'token_vectors': model.embed.token_vectors(inputs['tokens'])}
    arch_at = lambda i: jax.tree.map(lambda x: x[i], archs)
    first = arch_at(0)
    # Sub-network i < len(slices) runs as its dense model; `heads[i]` projects its pre-logit
    # states to logits (narrower than the supernet's where its hidden width is).
    dense = [cut(model) for cut in slices]
    heads = [m.project for m in dense]

    def trunk(i):
      if i >= len(dense):
        return model.pre_logits(inputs, arch_at(i), capture)
      # 'embed' too where layer outputs are captured: an off layer's output is its input.
      extra = ('embed',) if 'hidden' in capture and 'embed' not in capture else ()
      x, feats = dense[i].pre_logits(inputs, capture=capture + extra, scan=True)
      if capture:  # as the masked supernet would give them (shapes only: nothing runs twice)
        like = jax.eval_shape(lambda: model.pre_logits(inputs, arch_at(i), capture)[1])
        feats = masked_layout(feats, like, slices[i].source)
      return x, feats

    def padded(x):
      """Pre-logit states of a dense slice zero-padded to the supernet's width (what the masked
      supernet gives: its inactive channels are zeros), to project with the others."""
      width = model.head.pre_logits_width
      return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])

    x0, feats0 = trunk(0)
    project0 = heads[0] if heads else model.project
    in_place = spec.in_place and teacher is None
    if in_place:
      # The largest net learns from the data; it then teaches the others (stop-gradient).
      teacher = teacher_targets(x0, feats0)
    distilled = teacher is not None
    if distilled and not in_place:
      feature0 = feature_loss(feats0, batch, first, teacher, spec, projections, totals)
    else:
      feature0 = jnp.zeros((), jnp.float32)

    kl_teacher = None
    if distilled and w['logits_kl']:
      kl_teacher = 'first' if in_place else (take(teacher['pre_logits']), teacher['project'])
    if not logits_chunk:
      # Unchunked: each sub-network's logits inside the scan below, the teacher's
      # log-probabilities computed once, before it.
      logits0 = project0(take(x0))
      log_p_t = None
      if kl_teacher is not None:
        t_logits = logits0 if in_place else kl_teacher[1](kl_teacher[0])
        log_p_t = jax.lax.stop_gradient(losses.teacher_log_probs(t_logits, spec.temperature))

      def vocab(logits):
        ce = losses.token_cross_entropy(logits, targets, weights)[0]
        kl = (jnp.zeros((), jnp.float32) if log_p_t is None else
              losses.kl_to_teacher(logits, log_p_t, weights, spec.temperature))
        return ce, kl

      ce0, kl0 = vocab(logits0)
      kl0 = jnp.zeros((), jnp.float32) if in_place else kl0

    def student(x, feats, arch, project):
      feature = (feature_loss(feats, batch, arch, teacher, spec, projections, totals)
                 if distilled and capture else jnp.zeros((), jnp.float32))
      return (vocab(project(take(x))) if not logits_chunk else padded(take(x)), feature)

    def body(arch):
      x, feats = model.pre_logits(inputs, arch, capture)
      return student(x, feats, arch, model.project)

    # The dense slices after the first, then the masked sub-networks (unrolled or looped).
    start = max(len(dense), 1)
    outs = [student(*trunk(i), arch_at(i), heads[i]) for i in range(1, start)]
    rest = jax.tree.map(lambda x: x[start:], archs)
    out_rest, features_rest = scan_map(body, rest, unroll_subnets or unroll_inner)
    if outs:
      stacked = jax.tree.map(lambda *v: jnp.stack(v), *outs)
      out_rest, features_rest = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), stacked,
                                             (out_rest, features_rest))
    if logits_chunk:
      x0 = padded(take(x0)) if dense else take(x0)
    if not logits_chunk:
      ce_K = jnp.concatenate([ce0[None], out_rest[0]])
      kl_K = jnp.concatenate([kl0[None], out_rest[1]])
    else:
      # Chunked: the trunks' pre-logit states, then every sub-network's losses chunk by chunk.
      ce_K, kl_K = losses.vocab_losses(jnp.concatenate([x0[None], out_rest]), model.project,
                                       targets, weights, teacher=kl_teacher,
                                       temperature=spec.temperature, chunk=logits_chunk,
                                       unroll=unroll_inner,
                                       unroll_students=unroll_subnets or unroll_inner)
    ces = ce_K / totals['weights']
    if not distilled:
      per_arch = ces
    else:
      taught = w['logits_kl'] * kl_K / totals['weights'] + jnp.concatenate(
          [feature0[None], features_rest])
      student = w['ce'] * ces + totals.get('distill', 1.0) * taught
      # In-place, the first (the teacher) learns from the data alone.
      is_student = jnp.arange(ces.shape[0]) > 0 if in_place else jnp.ones(ces.shape, bool)
      per_arch = jnp.where(is_student, student, ces)
    return jnp.sum(per_arch), (per_arch, ces)

  return loss_fn


def make_train_step(graphdef, proj_graphdef, sampler, tx: optax.GradientTransformation,
                    spec: DistillSpec, grad_accum: int,
                    external_teacher: Callable | None = None, *, micro_sharding=None,
                    logits_chunk: int = 0, unroll_subnets: bool = True,
                    unroll_inner: bool = False,
                    gather: Callable | None = None, slices: tuple[Callable, ...] = ()):
  """Returns step(state, batch[, teacher_params[, allowed]]) -> (state, metrics).

  `allowed`: the sampler's `Allowed` (arrays) when the space changes in training, else None.

  Metrics: `loss` (the step's objective: the sum over its K sub-networks of their losses),
  `loss_per_arch` and `ce_per_arch` (float32[K], in the sampler's order), `grad_norm`, `finite`.
  `micro_sharding`: the sharding of the stacked micro-batches (see `split_microbatches`);
  `logits_chunk`, `unroll_subnets`, `unroll_inner`, `gather`, `slices`: see `make_loss_fn`
  (`slices` only for a step without `allowed`: those archs are the sampler's, every step).
  """
  loss_fn = make_loss_fn(graphdef, proj_graphdef, spec, external_teacher,
                         logits_chunk=logits_chunk, unroll_subnets=unroll_subnets,
                         unroll_inner=unroll_inner, gather=gather, slices=slices)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch, teacher_params=None, allowed=None):
    if slices and allowed is not None:
      raise ValueError('dense slices of static archs need a space that stays the same')
    archs = sampler(jax.random.wrap_key_data(state.rng), state.step, allowed)
    totals = token_totals(batch)  # of the global batch, before it is split
    scale = spec.scale(state.step)
    if scale is not None:
      totals['distill'] = scale
    micro = split_microbatches(batch, grad_accum, micro_sharding)

    def one(mb):
      (loss, (per_arch, ces)), grads = grad_fn(state.params, mb, archs, teacher_params, totals)
      return grads, loss, per_arch, ces

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    k = jnp.zeros(sampler.k)
    # Each micro-batch's terms are already divided by the global token counts: sums, not means.
    grads, loss, per_arch, ces = sum_over_microbatches(one, (zeros, jnp.zeros(()), k, k), micro)
    state, metrics = apply_gradients(state, grads, loss, tx)
    return state, {**metrics, 'loss_per_arch': per_arch, 'ce_per_arch': ces}

  return step


def sum_over_microbatches(fn, init, micro):
  """The sum of the pytree `fn(mb)` over the stacked micro-batches `micro` (one `lax.scan`; the
  carry starts at `init`, the same structure)."""
  return scan_sum(lambda mb: (fn(mb), None), init, micro)[0]


def apply_gradients(state: TrainState, grads, loss, tx: optax.GradientTransformation):
  """(the state after one optimizer update with `grads`, {loss, grad_norm, finite})."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  # A checkpoint must never hold non-finite parameters: check the updated ones, not just the loss.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(params))
  return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
          {'loss': loss, 'grad_norm': grad_norm, 'finite': finite})


def make_dense_step(graphdef, tx: optax.GradientTransformation, grad_accum: int, *,
                    micro_sharding=None, gather: Callable | None = None):
  """step(state, batch) -> (state, metrics) of a dense model (`state.params['model']`, called
  with arch=None): the plain cross-entropy step a non-elastic trainer runs, with the same
  micro-batches, normalisation and update as `make_train_step`. `elastic-jax compile` compiles it
  for the largest sub-network's export as the reference the masked step is measured against.
  `gather`: see `make_loss_fn`."""
  def loss_fn(params, mb, totals):
    model = nnx.merge(graphdef, params['model'] if gather is None else gather(params['model']))
    take, targets, weights = losses.at_predictions(mb)
    logits = model.project(take(model.pre_logits(model_inputs(mb))[0]))
    return losses.token_cross_entropy(logits, targets, weights)[0] / totals['weights']

  grad_fn = jax.value_and_grad(loss_fn)

  def step(state: TrainState, batch):
    totals = token_totals(batch)
    micro = split_microbatches(batch, grad_accum, micro_sharding)

    def one(mb):
      loss, grads = grad_fn(state.params, mb, totals)
      return grads, loss

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, loss = sum_over_microbatches(one, (zeros, jnp.zeros(())), micro)
    return apply_gradients(state, grads, loss, tx)

  return step


def make_optimizer(tcfg):
  """(AdamW with warmup + cosine / linear decay and clipping, the LR schedule); weight decay on
  matrices only."""
  from elastic_jax.errors import UserError
  peak, warmup, steps = tcfg.learning_rate, tcfg.warmup_steps, tcfg.steps
  end = peak * tcfg.end_lr_fraction
  decay_steps = max(steps - warmup, 1)
  if tcfg.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=tcfg.end_lr_fraction)
  elif tcfg.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif tcfg.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise UserError(f"config field train.schedule={tcfg.schedule!r} is invalid; allowed values "
                    "are ['cosine', 'linear', 'constant']")
  schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), decay],
                                  [max(warmup, 1)])
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(tcfg.grad_clip)] if tcfg.grad_clip else []
  parts.append(optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule
