"""The `compress` config section, every field commented."""

from __future__ import annotations

import ml_collections


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
