"""The dynamic modules inside a training run: when to measure, grow and prune, the space's
history in the workdir (elastic_jax/space_history.py), resumption, and what is logged.

After step s (the state after s updates): a PCA measurement when s % pca_every == 0, growth when
s % growth_every == 0, pruning when s % prune_every == 0, in that order, before step s's
checkpoint; the history is written (atomically) first, so a checkpoint never holds weights of a
space its history lacks. A run resumed from the checkpoint of step S keeps the history up to S
(later entries belong to a run that did not reach its next checkpoint) and continues from the
space at S: the measurements, growth and pruning decisions read only the weights and the fixed
calibration batch, so the resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import data, evaluation, space_history
from elastic_jax.errors import UserError
from elastic_jax.space import Limits
from elastic_jax.train.dynamic import growth, head_pruning
from elastic_jax.train.dynamic.config import enabled


def calibration_batch(data_cfg, n: int) -> dict:
  """The first `n` batches of a fresh pass over the training data, as one batch."""
  iterator = data.train_iterator(data_cfg, process_index=0, process_count=1)
  keep = evaluation.MODEL_INPUTS + evaluation.LOSS_INPUTS
  batches = [{k: np.asarray(v) for k, v in next(iterator).items() if k in keep}
             for _ in range(n)]
  return {k: jnp.asarray(np.concatenate([b[k] for b in batches])) for k in batches[0]}


class Controller:
  """Owns the run's current limits and changes them (and, pruning, the weights' head order)."""

  def __init__(self, cfg, workdir, space, setup, *, is_main: bool):
    if jax.process_count() > 1:
      raise UserError('train.dynamic runs in one process only (its decisions are made on the '
                      'host); set growth_every=0 and prune_every=0 for multi-process training')
    d = cfg.train.dynamic
    self.cfg, self.d, self.workdir, self.space, self.setup = cfg, d, workdir, space, setup
    self.is_main = is_main
    self.blocks = space.cfg.blocks
    self.growth_every = int(d.growth_every)
    self.pca_every = int(d.pca_every) or self.growth_every
    self.prune_every = int(d.prune_every)
    self.calib = calibration_batch(cfg.data, int(d.calib_batches))
    if self.growth_every:
      self.step_w, _, widths = space_history.growth_widths(cfg)
      self.cap = widths[-1] if widths else max(space.cfg.ffn)
      self.measure = growth.make_measure(setup.graphdef, float(d.pca_eta))
      self.mean_params = growth.make_mean_params(space, int(d.budget_samples), int(cfg.seed))
      self.ffn_kinds = [b for b, k in enumerate(self.blocks) if k != 'skip']
    if self.prune_every:
      unsupported = sorted(set(space.cfg.kinds) - set(head_pruning.ATTENTION_BLOCKS))
      if unsupported:
        raise UserError(f'head pruning (train.dynamic.prune_every) supports the block types '
                        f'{list(head_pruning.ATTENTION_BLOCKS)}; the space has {unsupported}')
      self.cka = head_pruning.make_head_cka(setup.graphdef)
      self.attn_kinds = [b for b, k in enumerate(self.blocks) if k in head_pruning.ATTENTION_BLOCKS]
      self.names = head_pruning.param_names(jax.eval_shape(setup.init_params)['model'])
    self.history = None

  @staticmethod
  def wanted(cfg) -> bool:
    return enabled(cfg.train.get('dynamic', None))

  # -- state --------------------------------------------------------------------------------
  def start(self, restored_step: int | None) -> None:
    """The history of a fresh run, or a resumed run's up to its checkpoint."""
    history = space_history.load(self.workdir) if restored_step is not None else None
    if history is None:
      history = {'initial': space_history.initial_limits(self.cfg), 'events': [],
                 'measurements': []}
    else:
      history = space_history.truncated(history, restored_step)
    self.history = history
    self.current = space_history.limits_at(history, restored_step)
    self._save()

  def _save(self) -> None:
    if self.is_main:
      space_history.save(self.workdir, self.history)

  def limits(self) -> Limits:
    return self.space.make_limits(self.current['ffn_max'], self.current['heads_allowed'])

  def allowed(self):
    """The sampler's `Allowed` for the current limits, on the mesh (replicated)."""
    from elastic_jax import parallel  # noqa: PLC0415
    allowed = self.setup.sampler.allowed(self.limits())
    return jax.device_put(allowed, parallel.replicated(self.setup.mesh))

  # -- the modules ----------------------------------------------------------------------------
  def after_step(self, step: int, state):
    """(state, whether the space changed, scalars to log, messages) after training step `step`."""
    changed, log, messages = False, {}, []
    params = state.params['model']
    if self.growth_every and step % self.pca_every == 0:
      archs = growth.probe_archs(self.space, self.limits(), self.ffn_kinds)
      counts_AxL = np.asarray(self.measure(params, self.calib, archs))
      pca = np.zeros((self.space.num_layers, len(self.blocks)))
      pca[:, self.ffn_kinds] = counts_AxL.T
      self.history['measurements'].append({'step': step, 'pca': pca.tolist()})
    if self.growth_every and step % self.growth_every == 0:
      changed |= self._grow(step, log, messages)
    if self.prune_every and step % self.prune_every == 0:
      state, pruned = self._prune(step, state, log, messages)
      changed |= pruned
    self._save()
    return state, changed, log, messages

  def _record(self, step, kind, what_key, what) -> None:
    self.history['events'].append({'step': step, 'kind': kind, what_key: what,
                                   'ffn_max': self.current['ffn_max'],
                                   'heads_allowed': self.current['heads_allowed']})

  def _grow(self, step, log, messages) -> bool:
    last = max([e['step'] for e in self.history['events'] if e['kind'] == 'growth'] + [0])
    window = [m['pca'] for m in self.history['measurements'] if last < m['step'] <= step]
    if not window:
      return False
    pca_LxB = np.mean(np.asarray(window, np.float64), axis=0)
    limits = self.limits()
    new, grown = growth.grow(self.space, self.current['ffn_max'], pca_LxB, step=self.step_w,
                             cap=self.cap, fraction=float(self.d.growth_fraction),
                             budget=int(self.d.growth_budget), mean_params=self.mean_params,
                             heads_ok=limits.heads_ok, rank=str(self.d.growth_rank))
    log['dynamic/grown'] = len(grown)
    for layer, row in enumerate(new):
      for b in self.ffn_kinds:
        log[f'dynamic/ffn_max/L{layer}/{self.blocks[b]}'] = row[b]
        log[f'dynamic/pca/L{layer}/{self.blocks[b]}'] = float(pca_LxB[layer, b])
    if not grown:
      messages.append(f'step {step}: width growth: nothing grew (at the cap or over budget)')
      return False
    self.current = {**self.current, 'ffn_max': new}
    log['dynamic/mean_params'] = self.mean_params(self.limits())
    self._record(step, 'growth', 'grown', grown)
    messages.append(f'step {step}: width growth: ' + ', '.join(
        f'layer {g["layer"]} {g["block"]} FFN {g["from"]} -> {g["to"]} (PCA {g["pca"]:.1f})'
        for g in grown))
    return True

  def _prune(self, step, state, log, messages):
    params = state.params['model']
    archs = growth.probe_archs(self.space, self.limits(), self.attn_kinds)
    cka_AxLxHxH = np.asarray(self.cka(params, self.calib, archs))
    heads_allowed = [[list(h) for h in row] for row in self.current['heads_allowed']]
    max_heads = int(self.space.tables['heads'].max())
    pruned = []
    for a, b in enumerate(self.attn_kinds):
      kind = self.blocks[b]
      width = (max(self.space.cfg.hidden) if kind == 'transformer'
               else max(self.space.cfg.inner))
      for layer in range(self.space.num_layers):
        active = max(heads_allowed[layer][b])
        kept, dropped = head_pruning.choose_heads(
            cka_AxLxHxH[a, layer], active, float(self.d.cka_threshold),
            width if self.d.heads_divide_width else None)
        log[f'dynamic/heads/L{layer}/{kind}'] = len(kept)
        if not dropped:
          continue
        order = np.asarray(kept + dropped + list(range(active, max_heads)))
        state = state.replace(
            params=head_pruning.permute_heads(state.params, self.names, layer, kind, order),
            opt_state=head_pruning.permute_heads(state.opt_state, self.names, layer, kind, order))
        heads_allowed[layer][b] = sorted({h for h in heads_allowed[layer][b] if h <= len(kept)}
                                         | {len(kept)})
        off = cka_AxLxHxH[a, layer][np.ix_(kept, dropped)]
        pruned.append({'layer': layer, 'block': kind, 'dropped': dropped, 'kept': len(kept),
                       'max_cka': float(off.max()) if off.size else 0.0})
    log['dynamic/pruned_heads'] = sum(len(p['dropped']) for p in pruned)
    if not pruned:
      messages.append(f'step {step}: head pruning: no head above CKA {self.d.cka_threshold}')
      return state, False
    state = jax.device_put(state, self.setup.state_shardings)
    self.current = {**self.current, 'heads_allowed': heads_allowed}
    self._record(step, 'prune', 'pruned', pruned)
    messages.append(f'step {step}: head pruning: ' + ', '.join(
        f'layer {p["layer"]} {p["block"]} heads {p["dropped"]} dropped, {p["kept"]} kept'
        for p in pruned))
    return state, True
