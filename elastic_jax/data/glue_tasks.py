"""What each GLUE task is: its files' columns, its labels, and the metric it is reported with."""

from __future__ import annotations

import dataclasses

from elastic_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task.

  Attributes:
    name: canonical lower-case name ('sst2').
    dir_name: the task's folder in the GLUE distribution ('SST-2').
    text_columns: header names of the one or two text columns (CoLA has no header: column 3).
    label_column: header name of the label column.
    label_names: class names in label-id order (TFDS's order); () for regression.
    metric: the metric GLUE reports for the task.
    splits: split name -> file name; 'train' and 'validation' are required, test files optional.
    tfds_keys: the text features of tfds:glue/<tfds_name>, to read the same task from TFDS.
    tfds_name: the task's TFDS config name.
    tfds_validation: the TFDS split that plays 'validation'.
  """

  name: str
  dir_name: str
  text_columns: tuple[str, ...]
  label_column: str
  label_names: tuple[str, ...]
  metric: str
  splits: tuple[tuple[str, str], ...]
  tfds_keys: tuple[str, ...]
  tfds_name: str
  tfds_validation: str = 'validation'

  @property
  def is_regression(self) -> bool:
    return not self.label_names

  @property
  def num_labels(self) -> int:
    return len(self.label_names) or 1

  @property
  def is_pair(self) -> bool:
    return len(self.text_columns) == 2

  @property
  def has_header(self) -> bool:
    return self.name != 'cola'


_STANDARD_SPLITS = (('train', 'train.tsv'), ('validation', 'dev.tsv'), ('test', 'test.tsv'))
_ENTAILMENT = ('entailment', 'not_entailment')

TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask('cola', 'CoLA', ('sentence',), 'label', ('unacceptable', 'acceptable'),
             'matthews_corrcoef', _STANDARD_SPLITS, ('sentence',), 'cola'),
    GlueTask('sst2', 'SST-2', ('sentence',), 'label', ('negative', 'positive'), 'accuracy',
             _STANDARD_SPLITS, ('sentence',), 'sst2'),
    GlueTask('mrpc', 'MRPC', ('#1 String', '#2 String'), 'Quality',
             ('not_equivalent', 'equivalent'), 'f1', _STANDARD_SPLITS,
             ('sentence1', 'sentence2'), 'mrpc'),
    GlueTask('qqp', 'QQP', ('question1', 'question2'), 'is_duplicate',
             ('not_duplicate', 'duplicate'), 'f1', _STANDARD_SPLITS,
             ('question1', 'question2'), 'qqp'),
    GlueTask('stsb', 'STS-B', ('sentence1', 'sentence2'), 'score', (), 'pearson',
             _STANDARD_SPLITS, ('sentence1', 'sentence2'), 'stsb'),
    GlueTask('mnli', 'MNLI', ('sentence1', 'sentence2'), 'gold_label',
             ('entailment', 'neutral', 'contradiction'), 'accuracy',
             (('train', 'train.tsv'), ('validation', 'dev_matched.tsv'),
              ('validation_mismatched', 'dev_mismatched.tsv'), ('test', 'test_matched.tsv'),
              ('test_mismatched', 'test_mismatched.tsv')),
             ('premise', 'hypothesis'), 'mnli', 'validation_matched'),
    GlueTask('qnli', 'QNLI', ('question', 'sentence'), 'label', _ENTAILMENT, 'accuracy',
             _STANDARD_SPLITS, ('question', 'sentence'), 'qnli'),
    GlueTask('rte', 'RTE', ('sentence1', 'sentence2'), 'label', _ENTAILMENT, 'accuracy',
             _STANDARD_SPLITS, ('sentence1', 'sentence2'), 'rte'),
    GlueTask('wnli', 'WNLI', ('sentence1', 'sentence2'), 'label', ('not_entailment', 'entailment'),
             'accuracy', _STANDARD_SPLITS, ('sentence1', 'sentence2'), 'wnli'),
)}


def get_task(task: str) -> GlueTask:
  """Looks a task up by any common spelling: 'SST-2', 'sst2', 'STS-B', 'glue/cola'."""
  key = task.lower().removeprefix('glue/').replace('-', '').replace('_', '')
  if key not in TASKS:
    raise UserError(f'unknown GLUE task {task!r}; use one of {", ".join(TASKS)} '
                    '(set data.glue_task)')
  return TASKS[key]


def glue_task_info(task: str) -> tuple[int, str, bool]:
  """(num_labels, metric_name, is_regression) of a GLUE task; num_labels is 1 for regression."""
  spec = get_task(task)
  return spec.num_labels, spec.metric, spec.is_regression
