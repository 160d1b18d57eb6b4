"""What fine-tuning on SQuAD (v1.1 'squad', v2.0 'squad_v2') needs from the trainer's point of
view: the span head, the windows of both splits, the loss and the dev EM / F1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from elastic_jax.errors import UserError
from elastic_jax.finetune import squad_data, squad_metrics, squad_predict, squad_windows
from elastic_jax.finetune.span_head import SpanHead


class SquadJob:
  """Extractive QA: start / end logits over the encoder's hidden states (encoders only)."""

  label_keys = ('start', 'end')
  per_token = True  # outputs per position: evaluated at the full window length

  def __init__(self, name: str):
    self.name = name
    self.version = squad_data.VERSIONS[name]

  def epochs(self, cfg) -> int:
    return int(cfg.epochs)

  def head(self, backbone, seed: int, pooling: str = 'auto',
           pair_encoding: str = 'cross') -> SpanHead:
    del pooling, pair_encoding  # spans are read from every token of question + context
    if backbone.cfg.kind != 'encoder':
      raise UserError(f'{self.name} fine-tuning reads spans with an encoder; this model is a '
                      f'{backbone.cfg.kind} (fine-tune it on a GLUE task instead)')
    return SpanHead(backbone, rngs=nnx.Rngs(seed))

  def load(self, cfg, tokenizer, kind: str, seq_len: int):
    """(train window arrays, (dev examples, dev windows))."""
    if not cfg.squad_dir:
      raise UserError('finetune.squad_dir is empty: set --config.finetune.squad_dir to a '
                      f'directory holding the SQuAD {self.version} JSON files, or to \'tfds\'')
    train, dev = squad_data.load_splits(cfg.squad_dir, self.name, cfg.cache_dir,
                                        (cfg.max_train_examples, cfg.max_dev_examples))
    if self.version == 'v1.1' and any(ex.is_impossible for ex in train):
      raise UserError(f'{cfg.squad_dir}: the training questions include unanswerable ones '
                      '(is_impossible); fine-tune them as --task=squad_v2')
    encode = lambda examples: squad_windows.encode(  # noqa: E731
        examples, tokenizer, seq_len, cfg.doc_stride, cfg.max_query_len)
    return encode(train).arrays, (dev, encode(dev))

  def loss(self, outputs_BT2, batch, teacher_BT2, cfg):
    """Mean of the start and end cross-entropies over real windows; with a teacher, the soft
    cross-entropy to its start / end distributions (weighted as for GLUE)."""
    w_B = batch['weight']
    hard_B = (optax.softmax_cross_entropy_with_integer_labels(outputs_BT2[..., 0], batch['start'])
              + optax.softmax_cross_entropy_with_integer_labels(outputs_BT2[..., 1],
                                                                batch['end'])) / 2
    loss_B = hard_B
    if teacher_BT2 is not None:
      t = cfg.temperature
      student_B2T = jnp.swapaxes(outputs_BT2, 1, 2) / t
      soft_B2 = optax.softmax_cross_entropy(
          student_B2T, jax.nn.softmax(jnp.swapaxes(teacher_BT2, 1, 2) / t))
      loss_B = cfg.hard_weight * hard_B + cfg.distill_weight * soft_B2.mean(-1)
    return jnp.sum(loss_B * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)

  def evaluate(self, outputs_of, dev, cfg) -> dict[str, float]:
    examples, windows = dev
    logits_WT2 = outputs_of(windows.arrays)
    predictions = squad_predict.best_answers(
        examples, windows, logits_WT2[..., 0], logits_WT2[..., 1], n_best=cfg.n_best,
        max_answer_len=cfg.max_answer_len, allow_impossible=self.version == 'v2.0',
        null_threshold=cfg.null_threshold)
    return squad_metrics.evaluate(examples, predictions, self.version)

  def size(self, split) -> int:
    return len(split['start'])
