"""The `compress` config section, every field commented, and its check (`section`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import ml_collections

from elastic_jax.config import check_known_fields
from elastic_jax.errors import UserError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Importance sorting (elastic_jax/compress/importance.py), on batches of the training stream.
  c.calibration_batches = 8  # batches of data.batch_size x data.seq_len tokens
  c.min_calibration_tokens = 1024  # fewer calibration tokens than this is refused
  c.importance = 'activation'  # 'activation' | 'taylor' (first-order gradient x weight)
  c.layer_importance = 'cosine'  # 'cosine' (1 - cos(in, out)) | 'loss' (increase when removed)
  # Supernet fine-tuning from the original (the train section sets steps, learning rate, ...).
  c.teacher = 'original'  # 'original' (external teacher: logits KL) | 'in_place' (largest)
  # train.sampling for the supernet: 'anchored' (every step trains one anchor per budget, see
  # `anchors`, the shapes the search starts from, plus train.num_random sub-networks spread over
  # the sizes between them; needs teacher='original') | 'stratified' (whittle's: largest,
  # smallest and sizes over the whole space) | 'sandwich' | ...
  c.sampling = 'anchored'
  # The anchors: 'loss' = per budget, the uniform model (one per width, as many of the most
  # important layers as fit, anchor_low..1 x the budget, at most anchor_candidates) with the
  # lowest loss of the sorted original on the calibration batches, all scored in one population
  # call; 'pruning' = the pruning rule's model (most parameters), the baselines' shape.
  c.anchors = 'loss'
  c.anchor_low = 0.85
  c.anchor_candidates = 32
  # Budgets of the exported models: 'params=0.3,0.5,0.7' (fractions of the original, or
  # absolute counts > 1 such as 50M).
  c.budgets = 'params=0.3,0.5,0.7'
  # Start the search from the pruning rule's models at the budgets and between them (and
  # between the largest budget and the original), besides the smallest and largest: NSGA-II
  # then improves on shapes known to be good instead of on random per-layer choices alone.
  c.seed_search = True
  c.baselines = True  # structural-pruning baselines (a) pruned, (b) pruned + fine-tuned
  # The baselines (a) and (b) take the searched model's parameter count, so where the search
  # picked a uniform model the pruning rule picks that same shape and (b) differs from the
  # searched model only in being fine-tuned alone. Also prune (and fine-tune) the rule's own
  # model at each budget, its shape chosen by the budget alone: pruning without the search's
  # information (rows (a') and (b'); no extra work where the two shapes agree).
  c.budget_baselines = True
  c.latency_batch = 1  # rows of the batch whose forward latency is measured
  return c


TEACHERS = ('original', 'in_place')
ANCHORS = ('loss', 'pruning')
# Fields that must be whole numbers at least this large; `anchor_low` is checked on its own.
_AT_LEAST = {'calibration_batches': 1, 'min_calibration_tokens': 0, 'anchor_candidates': 1,
             'latency_batch': 1}


def _invalid(field: str, value, allowed: str) -> UserError:
  return UserError(f'config field compress.{field}={value!r} is invalid: {allowed}')


def section(cfg) -> ml_collections.ConfigDict:
  """The `compress` section of `cfg` (a ConfigDict, or None) over the defaults, every field
  checked: a UserError naming the first unknown field, or the first value of the wrong type or
  outside what is accepted, and what is. Cheap: `compress` checks the config with it before the
  import reads the checkpoint."""
  from elastic_jax.compress.importance import LAYER_METHODS, METHODS  # noqa: PLC0415
  from elastic_jax.train.sampling import STRATEGIES  # noqa: PLC0415
  merged = default_config()
  given = cfg.get('compress') if cfg is not None else None
  if given is None:
    return merged
  if not isinstance(given, (Mapping, ml_collections.ConfigDict)):
    raise UserError(f'config section compress={given!r} is invalid: it must hold fields '
                    f'(known fields: {sorted(merged)})')
  check_known_fields('compress', given, merged)
  for name, value in given.items():
    default = merged[name]
    if isinstance(default, bool):
      ok, kind = isinstance(value, bool), 'True or False'
    elif isinstance(default, int):
      ok, kind = isinstance(value, int) and not isinstance(value, bool), 'a whole number'
    elif isinstance(default, float):
      ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
      kind = 'a finite number'
    else:
      ok, kind = isinstance(value, str), 'a string'
    if not ok:
      raise _invalid(name, value, f'must be {kind} (default {default!r})')
    merged[name] = value
  for name, low in _AT_LEAST.items():
    if merged[name] < low:
      raise _invalid(name, merged[name], f'must be >= {low}')
  for name, choices in (('importance', METHODS), ('layer_importance', LAYER_METHODS),
                        ('teacher', TEACHERS), ('sampling', STRATEGIES), ('anchors', ANCHORS)):
    if merged[name] not in choices:
      raise _invalid(name, merged[name], f'accepted values are {list(choices)}')
  if not 0 < merged.anchor_low <= 1:
    raise _invalid('anchor_low', merged.anchor_low, 'must lie in (0, 1] (a fraction of each '
                   'budget)')
  if merged.sampling == 'anchored' and merged.teacher != 'original':
    raise _invalid('teacher', merged.teacher, "compress.sampling='anchored' trains no largest "
                   "network to distil from in place; set compress.teacher='original' or "
                   "compress.sampling='stratified'")
  return merged
