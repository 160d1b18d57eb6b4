"""What fine-tuning on one GLUE task needs from the trainer's point of view: the head, the encoded
splits, the loss (with optional distillation) and the dev metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from elastic_jax.data.glue_tasks import GlueTask
from elastic_jax.errors import UserError
from elastic_jax.finetune import inputs, metrics
from elastic_jax.finetune.classifier import Classifier


class GlueJob:
  """One GLUE task: a classifier (or regressor, STS-B) over the pooled features."""

  label_keys = ('label',)
  per_token = False  # one output row per example: evaluation may cut batches to their length

  def __init__(self, task: GlueTask):
    self.task = task
    self.name = task.name

  def epochs(self, cfg) -> int:
    return int(cfg.epochs_cola if self.name == 'cola' else cfg.epochs)

  def head(self, backbone, seed: int, pooling: str = 'auto',
           pair_encoding: str = 'cross') -> Classifier:
    inputs.check_pair_encoding(pair_encoding)
    return Classifier(backbone, self.task.num_labels, pooling=pooling,
                      siamese=self.task.is_pair and pair_encoding == 'siamese',
                      rngs=nnx.Rngs(seed))

  def load(self, cfg, tokenizer, kind: str, seq_len: int):
    """(train arrays, dev arrays), each [N, seq_len] ([N, 2, seq_len] for siamese pairs) per
    input plus 'label' [N]."""
    if not cfg.glue_dir:
      raise UserError('finetune.glue_dir is empty: set --config.finetune.glue_dir to the GLUE '
                      "directory (holding CoLA/, SST-2/, ...) or to 'tfds'")
    corpus = inputs.open_task(cfg.glue_dir, self.task, cfg.cache_dir)
    train = inputs.encode_split(corpus.train, corpus.reader, tokenizer, self.task, kind, seq_len,
                                cfg.max_train_examples, cfg.pair_encoding)
    dev = inputs.encode_split(corpus.validation, corpus.reader, tokenizer, self.task, kind,
                              seq_len, cfg.max_dev_examples, cfg.pair_encoding)
    return train, dev

  def loss(self, outputs_BL, batch, teacher_BL, cfg):
    """Mean over real rows (weight 1) of the label loss and/or the distillation loss."""
    w_B = batch['weight']
    if self.task.is_regression:
      hard_B = jnp.square(outputs_BL[:, 0] - batch['label'])
    else:
      hard_B = optax.softmax_cross_entropy_with_integer_labels(outputs_BL, batch['label'])
    loss_B = hard_B
    if teacher_BL is not None:
      if self.task.is_regression:
        soft_B = jnp.square(outputs_BL[:, 0] - teacher_BL[:, 0])
      else:
        t = cfg.temperature
        soft_B = optax.softmax_cross_entropy(outputs_BL / t, jax.nn.softmax(teacher_BL / t))
      loss_B = cfg.hard_weight * hard_B + cfg.distill_weight * soft_B
    return jnp.sum(loss_B * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)

  def evaluate(self, outputs_of, dev, cfg) -> dict[str, float]:
    """`outputs_of(arrays)`: the head's outputs [N, num_labels] for every row."""
    logits = outputs_of(dev)
    pred = logits[:, 0] if self.task.is_regression else logits.argmax(-1)
    return metrics.task_metrics(self.task, pred, dev['label'])

  def size(self, split) -> int:
    return len(split['label'])
