"""Score architectures with zero-cost proxies: a population of sub-networks of the supernet in one
compiled call, or an exported dense model.

  scores = score_archs(supernet, space, archs, batches, proxy_cfg)   # {name: float64[P]}
  scores = score_dense(dense_model, batches, proxy_cfg)              # {name: float}
  print(json.dumps(as_records(archs, scores)))   # what `elastic-jax proxy` prints
  fn = population_scorer(supernet, space, batches, proxy_cfg, names=('wpca',))
  fn(archs) -> {name: jax.Array[P]}                                  # jitted, for search

The supernet's state is an argument of the jitted function and the arch is int32 data, so one
compilation serves every population of a given size. Within the call `lax.map` runs the archs
`proxy.chunk` at a time (1: a scan, so each arch skips its removed layers; > 1: vmapped), and a
scan runs the minibatches; per-minibatch scores are averaged. Parameter counts come from the
analytic cost model (`space.cost`), which equals the exported model's real count.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elastic_jax.arch import Arch
from elastic_jax.errors import UserError
from elastic_jax.proxies import features, gradients
from elastic_jax.proxies.config import ProxyConfig, check_names, proxy_config

_MODEL_INPUTS = ('tokens', 'positions', 'segment_ids', 'token_types')
_LOSS_GRADIENT = ('snip', 'grad_norm', 'synaptic_saliency', 'synaptic_diversity')
_FORWARD = ('vpca', 'head_confidence', 'softmax_confidence', 'activation_distance')
# Proxies needing at least two valid tokens (PCA) or two sequences (kernels over sequences).
_NEEDS_TOKENS = ('wpca', 'vpca')
_NEEDS_SEQUENCES = ('jacob_cov', 'activation_distance')


def _measures(names: tuple[str, ...]) -> tuple[str, ...]:
  """What the jitted core computes per batch: every name but the parameter count, and V-PCA in
  place of W-PCA (W-PCA = params x V-PCA is applied afterwards)."""
  out = []
  for n in names:
    m = 'vpca' if n == 'wpca' else n
    if m != 'params' and m not in out:
      out.append(m)
  return tuple(out)


def prepare_batches(batches: Sequence[Mapping] | Mapping, cfg: ProxyConfig, causal: bool,
                    names: Sequence[str]) -> dict[str, jax.Array]:
  """The first `cfg.num_batches` minibatches, checked, as arrays with a leading batch axis [K].

  Adds `valid` (float [K, B, T]: the tokens statistics read) and, for the loss-gradient proxies,
  `targets` / `weights`: the batch's own, or for a causal model without them the next token within
  the same segment. Raises UserError (one line) when there are too few batches, tokens or
  sequences for the requested proxies.
  """
  if isinstance(batches, Mapping):
    batches = [{k: np.asarray(v)[i] for k, v in batches.items()}
               for i in range(np.asarray(batches['tokens']).shape[0])]
  batches = list(batches)
  if len(batches) < cfg.num_batches:
    raise UserError(f'proxies need proxy.num_batches={cfg.num_batches} minibatches but only '
                    f'{len(batches)} were given; lower proxy.num_batches or raise '
                    'data.eval_batches')
  batches = batches[:cfg.num_batches]
  out = []
  needs_targets = any(n in _LOSS_GRADIENT for n in names)
  for batch in batches:
    tokens = np.asarray(batch['tokens'], np.int32)
    if tokens.ndim != 2:
      raise UserError(f'batch tokens must be [batch, seq_len]; got shape {tokens.shape}')
    b, t = tokens.shape
    seg = np.asarray(batch['segment_ids']) if 'segment_ids' in batch else np.ones((b, t))
    valid = (seg != 0) if cfg.padding == 'exclude' else np.ones((b, t), bool)
    item = {k: np.asarray(batch[k]) for k in _MODEL_INPUTS if k in batch}
    item['valid'] = valid.astype(np.float32)
    if needs_targets:
      if 'targets' in batch:
        item['targets'] = np.asarray(batch['targets'], np.int32)
        item['weights'] = np.asarray(batch.get('weights', np.ones((b, t))), np.float32)
      elif causal:
        real = seg != 0
        nxt = np.zeros_like(tokens)
        nxt[:, :-1] = tokens[:, 1:]
        same = np.zeros((b, t), bool)
        same[:, :-1] = real[:, :-1] & (seg[:, :-1] == seg[:, 1:])
        item['targets'], item['weights'] = nxt, same.astype(np.float32)
      else:
        raise UserError('the loss-gradient proxies (snip, grad_norm, synaptic_saliency, '
                        'synaptic_diversity) need batches with targets and weights for an '
                        'encoder (use data.task=mlm batches)')
    out.append(item)
  keys = set(out[0])
  if any(set(o) != keys for o in out):
    raise UserError('proxy minibatches must all carry the same fields')
  stacked = {k: np.stack([o[k] for o in out]) for k in sorted(keys)}
  if cfg.pool_batches:
    stacked = {k: v.reshape((1, -1) + v.shape[2:]) for k, v in stacked.items()}
  valid = stacked['valid']
  if any(n in _NEEDS_TOKENS for n in names):
    fewest = int(valid.sum(axis=(1, 2)).min())
    if fewest < 2:
      raise UserError(f'W-PCA needs at least 2 (non-padding) tokens per minibatch for a '
                      f'covariance; a minibatch has {fewest}')
  if any(n in _NEEDS_SEQUENCES for n in names):
    fewest = int((valid.sum(axis=2) > 0).sum(axis=1).min())
    if fewest < 2:
      bad = [n for n in names if n in _NEEDS_SEQUENCES]
      raise UserError(f'{", ".join(bad)} compare sequences and need at least 2 (non-empty) '
                      f'sequences per minibatch; a minibatch has {fewest}')
  return {k: jnp.asarray(v) for k, v in stacked.items()}


def _batch_measures(graphdef, state, arch, batch, cfg: ProxyConfig, measures: tuple[str, ...],
                    widths: tuple | None = None) -> jax.Array:
  """float32[len(measures)]: every measure of one network (masked arch or dense) on one batch.

  When a proxy back-propagates, the forward-only proxies read the features of its forward pass
  instead of running one of their own."""
  inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
  valid_BT = batch['valid']
  model = nnx.merge(graphdef, state)
  forward = tuple(m for m in measures if m in _FORWARD)
  backward = tuple(m for m in measures if m in _LOSS_GRADIENT or m == 'jacob_cov')
  capture = []
  if 'vpca' in forward:
    capture += ['ffn_in', 'ffn_kernel']
  if 'activation_distance' in forward:
    capture.append('ffn_pre')
  if 'head_confidence' in forward:
    capture.append('attn_probs')
  capture = tuple(capture)
  passes = gradients.sequence_passes(valid_BT.shape[0], cfg.backward_batch)
  if backward:
    values, feats = gradients.backward_proxies(
        graphdef, state, arch, inputs, batch, backward, cfg.jacob_k, passes, capture, forward)
  else:
    if 'softmax_confidence' in forward:
      logits, feats = features.logits_and_features(model, inputs, arch, capture)
    else:  # only inner features (or none): skip the vocabulary projection
      logits, feats = None, model.features(inputs, arch, capture=capture) if capture else {}
    sums, feats = features.slice_statistics(forward, logits, feats, valid_BT)
    values = features.mean_of_sums(sums)
  if forward:
    layers = features.ffn_layers(model, arch)
    if 'vpca' in forward:
      values['vpca'] = features.vpca(feats['ffn_in'], feats['ffn_kernel'], valid_BT, layers,
                                     cfg.eta, cfg.bottleneck_ffn, widths)
    if 'activation_distance' in forward:
      values['activation_distance'] = features.activation_distance(feats['ffn_on'], valid_BT,
                                                                   layers)
  if 'synflow' in measures:
    values['synflow'] = gradients.synflow(graphdef, state, arch, inputs, valid_BT, passes)
  return jnp.stack([jnp.asarray(values[m], jnp.float32) for m in measures])


def _mean_over_batches(graphdef, state, arch, stacked, cfg, measures, widths=None):
  def body(total, batch):
    return total + _batch_measures(graphdef, state, arch, batch, cfg, measures, widths), None
  total, _ = jax.lax.scan(body, jnp.zeros((len(measures),), jnp.float32), stacked)
  return total / stacked['valid'].shape[0]


@functools.partial(jax.jit, static_argnames=('graphdef', 'cfg', 'measures', 'widths'))
def _population(graphdef, state, archs, stacked, *, cfg: ProxyConfig, measures, widths):
  one = lambda arch: _mean_over_batches(graphdef, state, arch, stacked, cfg, measures, widths)
  return jax.lax.map(one, archs, batch_size=cfg.chunk if cfg.chunk > 1 else None)


@functools.partial(jax.jit, static_argnames=('graphdef', 'cfg', 'measures'))
def _dense(graphdef, state, stacked, *, cfg: ProxyConfig, measures):
  return _mean_over_batches(graphdef, state, None, stacked, cfg, measures)


def _assemble(names, measures, values_PxM, params_P) -> dict:
  out = {}
  for n in names:
    if n == 'params':
      out[n] = params_P
    elif n == 'wpca':
      out[n] = params_P * values_PxM[..., measures.index('vpca')]
    else:
      out[n] = values_PxM[..., measures.index(n)]
  return out


def pca_widths(space, cfg: ProxyConfig):
  """The `widths` argument of `_population`: archs run one at a time (chunk 1) can run each
  PCA at its layer's active widths, (FFN input width choices, FFN width choices) of the space
  (see `features.vpca`); None when archs are vmapped."""
  if cfg.chunk != 1:
    return None
  return tuple(space.cfg.hidden) + tuple(space.cfg.inner), tuple(space.cfg.ffn)


def _population_parts(model, space, batches, cfg, names):
  """(names, measures, fn: archs -> (int32[P] params, float32[P, M] measures))."""
  cfg = proxy_config(cfg)
  names = check_names(names) if names is not None else cfg.selected
  measures = _measures(names)
  stacked = prepare_batches(batches, cfg, space.model.causal, names)
  graphdef, state = nnx.split(model)
  widths = pca_widths(space, cfg)

  def raw(archs: Arch):
    params_P = jax.vmap(lambda a: space.cost(a)['params'])(archs)
    if measures:
      values = _population(graphdef, state, archs, stacked, cfg=cfg, measures=measures,
                           widths=widths)
    else:
      values = jnp.zeros(params_P.shape + (0,), jnp.float32)
    return params_P, values

  return names, measures, raw


def population_scorer(model: nnx.Module, space, batches, cfg=None,
                      names: Sequence[str] | None = None):
  """A function archs [P] -> {name: float32[P]} scoring a population in one jitted call.

  For search: `decode` genomes, then call it (its compilation is reused for every population of
  the same size). The supernet's parameters and the minibatches are fixed when it is made.
  """
  names, measures, raw = _population_parts(model, space, batches, cfg, names)

  def score(archs: Arch) -> dict[str, jax.Array]:
    params_P, values = raw(archs)
    return _assemble(names, measures, values, params_P.astype(jnp.float32))

  return score


def score_archs(model: nnx.Module, space, archs: Arch, batches, cfg=None,
                names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Every requested proxy of every arch, at the supernet's current (initial) weights.

  Args:
    model: the supernet (`Model(cfg, space.cfg.supernet_dims(), ...)`).
    space: the `Space` (for the analytic parameter count).
    archs: a batched `Arch` [P] (e.g. `space.sample(key, P)`), or a single arch.
    batches: minibatches (dicts with `tokens` [B, T] and optionally `segment_ids`, `positions`,
      `token_types`, `targets`, `weights`), e.g. `data.eval_batches(cfg.data)`; the first
      `proxy.num_batches` are used.
    cfg: the `proxy` config (ConfigDict, mapping or ProxyConfig); None = defaults.
    names: proxies to compute; None = `cfg.names`, or all.

  Returns:
    {name: float64[P]} (float64[1] for a single arch); higher = predicted better.
  """
  if archs.hidden.ndim == 0:
    archs = jax.tree.map(lambda x: x[None], archs)
  names, measures, raw = _population_parts(model, space, batches, cfg, names)
  params_P, values = raw(archs)
  return _assemble(names, measures, np.asarray(values, np.float64),
                   np.asarray(params_P, np.float64))


def score_dense(model: nnx.Module, batches, cfg=None,
                names: Sequence[str] | None = None) -> dict[str, float]:
  """Every requested proxy of a dense (exported) model: {name: float}."""
  from elastic_jax.export import param_count  # noqa: PLC0415 (export imports the model)

  cfg = proxy_config(cfg)
  names = check_names(names) if names is not None else cfg.selected
  measures = _measures(names)
  stacked = prepare_batches(batches, cfg, model.cfg.causal, names)
  graphdef, state = nnx.split(model)
  params = np.float64(param_count(model))
  values = (np.asarray(_dense(graphdef, state, stacked, cfg=cfg, measures=measures), np.float64)
            if measures else np.zeros((0,)))
  return {k: float(v) for k, v in _assemble(names, measures, values, params).items()}


def as_records(archs: Arch, scores: Mapping[str, np.ndarray]) -> list[dict]:
  """One JSON-ready record per arch: {'arch': arch JSON, 'scores': {name: float or None}}.

  Non-finite scores (an activation-distance kernel of identical codes is singular: -inf) become
  None, since JSON has no infinities.
  """
  from elastic_jax import arch as arch_lib  # noqa: PLC0415

  if archs.hidden.ndim == 0:
    archs = jax.tree.map(lambda x: x[None], archs)
  out = []
  for i, arch in enumerate(arch_lib.unstack(archs)):
    values = {k: float(np.asarray(v)[i]) for k, v in scores.items()}
    out.append({'arch': arch_lib.to_json(arch),
                'scores': {k: (v if np.isfinite(v) else None) for k, v in values.items()}})
  return out
