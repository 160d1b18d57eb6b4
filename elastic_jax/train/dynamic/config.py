"""The `train.dynamic` config section (ELM's dynamic modules), every field commented."""

from __future__ import annotations

import ml_collections

from elastic_jax import space_history
from elastic_jax.errors import UserError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Width growth: every `growth_every` steps the top-ranked (layer, block type) FFNs by mean PCA
  # count grow their largest allowed width by `growth_step` x hidden, up to `growth_cap` x hidden
  # (the arrays are allocated at the cap from the start). 0 = off.
  c.growth_every = 0
  c.growth_step = 0.25  # x the largest hidden size (ELM's reference)
  c.growth_cap = 1.5  # x the largest hidden size (ELM's reference)
  c.pca_every = 0  # steps between PCA measurements, averaged at each growth point; 0 = growth_every
  c.pca_eta = 0.99  # explained-variance threshold of the PCA count (W-PCA's)
  # Share of the (layer, block type) FFNs below the cap that grow at a growth point (our choice:
  # the reference grows "the top-ranked blocks"; at least one).
  c.growth_fraction = 0.25
  # Ranking: 'count' (the mean PCA count, the reference) or 'share' (that count over the most it
  # can be, min(FFN input width, current width): compares BERT and bottleneck FFNs fairly).
  c.growth_rank = 'count'
  # No growth that lifts the mean parameter count of uniformly sampled architectures above this;
  # 0 = no budget.
  c.growth_budget = 0
  c.budget_samples = 256  # architectures sampled to estimate that mean
  # Head pruning: every `prune_every` steps, a head whose linear CKA with an earlier kept head of
  # the same layer and block exceeds `cka_threshold` leaves the allowed head counts. 0 = off.
  c.prune_every = 0
  c.cka_threshold = 0.9  # ELM's reference
  # Then the kept count is lowered until it divides the block's width (hidden, or a bottleneck's
  # inner width), as the reference does (its head size is width / heads).
  c.heads_divide_width = True
  c.calib_batches = 2  # training batches (the first of a fresh pass, the same every time)
  return c


def enabled(dcfg) -> bool:
  return bool(dcfg) and (int(dcfg.get('growth_every', 0)) > 0 or
                         int(dcfg.get('prune_every', 0)) > 0)


def check(cfg) -> None:
  """UserError naming the first impossible `train.dynamic` value (before a run creates
  anything)."""
  d = cfg.train.get('dynamic', None)
  if not d:
    return
  for name in ('growth_every', 'pca_every', 'prune_every', 'growth_budget'):
    v = d.get(name, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise UserError(f'config field train.dynamic.{name}={v!r} must be an integer >= 0')
  for name in ('calib_batches', 'budget_samples'):
    v = d.get(name, 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise UserError(f'config field train.dynamic.{name}={v!r} must be an integer >= 1')
  t = d.get('cka_threshold', 0.9)
  if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 < float(t) <= 1.0:
    raise UserError(f'config field train.dynamic.cka_threshold={t!r} must lie in (0, 1]')
  if not 0.0 < float(d.get('pca_eta', 0.99)) < 1.0:
    raise UserError(f'config field train.dynamic.pca_eta={d.pca_eta!r} must lie in (0, 1)')
  if not 0.0 < float(d.get('growth_fraction', 0.25)) <= 1.0:
    raise UserError(f'config field train.dynamic.growth_fraction={d.growth_fraction!r} must lie '
                    'in (0, 1]')
  if d.get('growth_rank', 'count') not in ('count', 'share'):
    raise UserError(f'config field train.dynamic.growth_rank={d.growth_rank!r} is invalid; '
                    "allowed values are ['count', 'share']")
  if int(d.get('growth_every', 0)) > 0:
    space_history.growth_widths(cfg)  # the cap below the current width, a zero step
  if int(d.get('prune_every', 0)) > 0 and float(cfg.train.distill.get('attn_kl', 0.0)):
    raise UserError('train.distill.attn_kl averages the teacher over a fixed head count, which '
                    'head pruning (train.dynamic.prune_every) changes; set one of them to 0')
  if enabled(d) and (cfg.train.sampling in ('stratified', 'fixed', 'anchored') or cfg.train.arch):
    raise UserError(f'train.sampling={cfg.train.sampling!r} (or train.arch) cannot follow a '
                    "space that changes in training (train.dynamic); use 'sandwich', 'random', "
                    "'standard' or 'random_linear'")
