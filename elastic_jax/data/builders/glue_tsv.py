"""TFDS builder for one GLUE task read from the TSV files of the GLUE distribution.

The files are parsed by header name where they have one (so a file with other columns is caught,
not silently misread) and positionally for CoLA's header-less train/dev files. Labels are stored as
TFDS ClassLabels in TFDS's own label order, so `glue_tsv` and `tfds:glue/<task>` agree; unlabelled
test rows get label -1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from elastic_jax.data import cache
from elastic_jax.data.builders import local
from elastic_jax.data.glue_tasks import GlueTask
from elastic_jax.errors import UserError

# CoLA train/dev: source, label, original label, sentence; no header.
_COLA_COLUMNS = ('source', 'label', 'original_label', 'sentence')


def _glue_root(glue_dir: str | Path, field: str) -> Path:
  root = Path(glue_dir).expanduser()
  if not root.is_dir():
    raise UserError(f'{field} {str(glue_dir)!r} is not a directory; point it at the GLUE '
                    'data folder holding CoLA/, SST-2/, ...')
  return root


def _task_dir(root: Path, task: GlueTask) -> Path | None:
  wanted = {task.dir_name.lower(), task.name, task.dir_name.lower().replace('-', '')}
  for child in sorted(root.iterdir()):
    if child.is_dir() and child.name.lower() in wanted:
      return child
  return root if (root / 'train.tsv').is_file() else None


def find_task_dir(glue_dir: str | Path, task: GlueTask, field: str = 'data.glue_dir') -> Path:
  """The task's folder: <glue_dir>/<CoLA|SST-2|...>, or glue_dir itself if it holds the files.
  `field`: the config field the user set glue_dir with, for the messages."""
  root = _glue_root(glue_dir, field)
  task_dir = _task_dir(root, task)
  if task_dir is None:
    raise UserError(f'GLUE task {task.name}: no {task.dir_name}/ folder in {root}; download GLUE '
                    f'there or set {field} to the folder holding it')
  return task_dir


def check_tasks(glue_dir: str | Path, tasks: Sequence[GlueTask],
                field: str = 'data.glue_dir') -> None:
  """One UserError naming every task of `tasks` without its folder or its train / validation
  file under glue_dir, and what is missing where, so that a run over several tasks finds them all
  before it starts on the first."""
  root = _glue_root(glue_dir, field)
  missing = []
  for task in tasks:
    task_dir = _task_dir(root, task)
    if task_dir is None:
      missing.append(f'{task.name} (no {root / task.dir_name}/)')
      continue
    absent = [str(task_dir / name) for _, name in task.splits[:2]
              if not (task_dir / name).is_file()]
    if absent:
      missing.append(f'{task.name} (no {" or ".join(absent)})')
  if missing:
    raise UserError(f'no data for GLUE task(s) {", ".join(missing)}; download GLUE into {root} or '
                    f'set {field} to the folder holding every task\'s folder')


def task_files(task_dir: Path, task: GlueTask) -> dict[str, Path]:
  """Split name -> TSV file, for the files present; train and validation must be there."""
  files = {split: task_dir / name for split, name in task.splits if (task_dir / name).is_file()}
  for split, name in task.splits[:2]:
    if split not in files:
      raise UserError(f'GLUE task {task.name}: {task_dir / name} is missing')
  return files


def read_rows(path: Path, task: GlueTask, split: str) -> Iterator[tuple[int, str, str, object]]:
  """Yields (row index, sentence1, sentence2, raw label or None) from a GLUE TSV file."""
  try:
    lines = path.read_text(encoding='utf-8-sig').split('\n')
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror}') from e
  except UnicodeDecodeError as e:
    raise UserError(f'{path} is not UTF-8 text; is it a GLUE TSV file?') from e
  labelled = not split.startswith('test')
  if task.has_header or not labelled:
    header = lines[0].rstrip('\r').split('\t')
    names = task.text_columns + ((task.label_column,) if labelled else ())
    missing = [n for n in names if n not in header]
    if missing:
      raise UserError(f'{path}: GLUE {task.name} needs columns {list(names)} in the header, found '
                      f'{header}; is this the {task.dir_name} {path.name}?')
    columns = [header.index(n) for n in names]
    width, first = len(header), 1
  else:
    columns = [_COLA_COLUMNS.index('sentence'), _COLA_COLUMNS.index('label')]
    width, first = len(_COLA_COLUMNS), 0
  index = 0
  for line_no, line in enumerate(lines[first:], start=first + 1):
    line = line.rstrip('\r')
    if not line.strip():
      continue
    fields = line.split('\t')
    if len(fields) != width:
      raise UserError(f'{path}:{line_no}: expected {width} tab-separated columns for GLUE '
                      f'{task.name}, found {len(fields)}')
    texts = [fields[c] for c in columns[:len(task.text_columns)]]
    label = fields[columns[-1]] if labelled else None
    yield index, texts[0], texts[1] if task.is_pair else '', label
    index += 1


def parse_label(raw: object, task: GlueTask, where: str) -> int | float:
  """A label id (classification) or score (regression); -1 for unlabelled rows."""
  if raw is None:
    return -1.0 if task.is_regression else -1
  text = str(raw).strip()
  if task.is_regression:
    try:
      value = float(text)
    except ValueError:
      value = math.nan
    if not math.isfinite(value):
      raise UserError(f'{where}: GLUE {task.name} label {text!r} is not a number')
    return value
  if text in task.label_names:
    return task.label_names.index(text)
  if text.isdigit() and int(text) < task.num_labels:
    return int(text)
  raise UserError(f'{where}: GLUE {task.name} label {text!r} is not one of '
                  f'{list(task.label_names)} or 0..{task.num_labels - 1}')


class GlueTsvConfig(tfds.core.BuilderConfig):
  """One task's files; the name keys the cache on the task and its files' sizes and mtimes."""

  def __init__(self, *, task: GlueTask, task_dir: Path):
    self.task = task
    self.files = task_files(task_dir, task)
    key = cache.stable_key(task.name, {s: cache.file_fingerprint(p) for s, p in self.files.items()})
    super().__init__(name=f'{task.name}-{key}', description=f'GLUE {task.dir_name} from {task_dir}')


class GlueTsv(local.LocalFilesBuilder, skip_registration=True):
  """A GLUE task from local TSV files as a TFDS dataset (build with file_format='array_record')."""

  name = 'glue_tsv'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    task: GlueTask = self.builder_config.task
    label = (np.float32 if task.is_regression
             else tfds.features.ClassLabel(names=list(task.label_names)))
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            'idx': np.int32,
            'sentence1': tfds.features.Text(),
            'sentence2': tfds.features.Text(),
            'label': label,
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(task=task.name, metric=task.metric,
                                        num_labels=task.num_labels,
                                        is_regression=task.is_regression,
                                        text_columns=list(task.text_columns)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {split: self._generate_examples(split, path)
            for split, path in self.builder_config.files.items()}

  def _generate_examples(self, split: str, path: Path):
    task = self.builder_config.task
    empty = True
    for index, sentence1, sentence2, raw_label in read_rows(path, task, split):
      label = parse_label(raw_label, task, f'{path} row {index + 1}')
      empty = False
      yield index, {'idx': index, 'sentence1': sentence1, 'sentence2': sentence2, 'label': label}
    if empty:
      raise UserError(f'{path} holds no examples (a header alone?); is it the GLUE '
                      f'{task.dir_name} {path.name}?')
