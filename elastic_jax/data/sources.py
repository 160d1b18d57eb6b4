"""From a data config to random-access train/validation sources, building TFDS datasets on demand.

Every source ends up as TFDS array_record files read through `builder.as_data_source()` (no
TensorFlow): local corpora are built once into the cache by this project's builders, TFDS catalog
datasets are prepared by TFDS itself. Records are normalised by small picklable readers so the
pipelines (and grain worker processes) see one format per task kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from elastic_jax import atomic
from elastic_jax.data import cache, glue_tasks
from elastic_jax.data.builders import glue_tsv, python_docs, text_files
from elastic_jax.data.config import DataConfig
from elastic_jax.errors import UserError

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LmRecords:
  """Reads (text, bos, eos) from a record; TFDS catalog records are whole documents."""

  text_key: str = 'text'
  has_piece_flags: bool = True

  def __call__(self, record: Mapping[str, Any]) -> tuple[str, bool, bool]:
    text = _as_str(record[self.text_key])
    if self.has_piece_flags:
      return text, bool(record['bos']), bool(record['eos'])
    return text, True, True


@dataclasses.dataclass(frozen=True)
class GlueRecords:
  """Reads (sentence1, sentence2, label) from a glue_tsv or tfds:glue record."""

  keys: tuple[str, ...] = ('sentence1', 'sentence2')

  def __call__(self, record: Mapping[str, Any]) -> tuple[str, str, Any]:
    first = _as_str(record[self.keys[0]])
    second = _as_str(record[self.keys[1]]) if len(self.keys) > 1 else ''
    return first, second, record['label']


@dataclasses.dataclass
class Corpus:
  """The splits of one dataset and how to read their records.

  Attributes:
    name: identifies the data (builder/config) for caches derived from it (trained tokenizers).
    kind: 'lm' (documents) or 'glue' (labelled sentences or pairs).
    splits: split name -> random-access source (len, [i], __getitems__).
    validation_split: the split used as the fixed held-out set.
    reader: record -> (text, bos, eos) for 'lm', (sentence1, sentence2, label) for 'glue'.
    glue_task: the task, for 'glue'.
    location: where the files are, for people.
  """

  name: str
  kind: str
  splits: dict[str, Any]
  validation_split: str | None
  reader: LmRecords | GlueRecords
  glue_task: glue_tasks.GlueTask | None
  location: str

  @property
  def train(self) -> Any:
    return self.splits['train']

  @property
  def validation(self) -> Any:
    if self.validation_split is None or len(self.splits[self.validation_split]) == 0:
      hint = ('it has no validation split' if self.name.startswith('tfds/') else
              'set data.validation_fraction > 0 (e.g. 0.05) to hold some out')
      raise UserError(f'{self.name} has no validation data: {hint}')
    return self.splits[self.validation_split]


def open_corpus(cfg: DataConfig, *, glue_dir_field: str = 'data.glue_dir') -> Corpus:
  """Builds (first time) or opens the dataset `cfg` selects; raises UserError on bad input.
  `glue_dir_field`: the config field the user set `cfg.glue_dir` with, for the messages (fine-tuning
  passes 'finetune.glue_dir')."""
  if cfg.is_tfds:
    return _open_tfds(cfg)
  if cfg.source == 'python_docs':
    config = python_docs.PythonDocsConfig(validation_fraction=cfg.validation_fraction)
    builder = _prepare(python_docs.PythonDocs, config, cfg)
    reader, task = LmRecords(), None
  elif cfg.source == 'text_files':
    config = text_files.TextFilesConfig(files=text_files.resolve_files(cfg.paths),
                                        doc_boundary=cfg.doc_boundary,
                                        validation_fraction=cfg.validation_fraction,
                                        encoding_errors=cfg.encoding_errors)
    builder = _prepare(text_files.TextFiles, config, cfg)
    reader, task = LmRecords(), None
  elif cfg.source == 'glue':
    task = glue_tasks.get_task(cfg.glue_task)
    config = glue_tsv.GlueTsvConfig(task=task, task_dir=glue_tsv.find_task_dir(
        cfg.glue_dir, task, field=glue_dir_field))
    builder = _prepare(glue_tsv.GlueTsv, config, cfg)
    reader = GlueRecords()
  else:  # DataConfig validation makes this unreachable.
    raise UserError(f'data.source {cfg.source!r} is not supported')
  splits = builder.as_data_source()
  return Corpus(name=f'{builder.name}/{builder.builder_config.name}',
                kind='glue' if task else 'lm', splits=dict(splits),
                validation_split='validation' if 'validation' in splits else None,
                reader=reader, glue_task=task, location=str(builder.data_dir))


def _prepare(builder_cls: type, config: Any, cfg: DataConfig) -> tfds.core.DatasetBuilder:
  """Builds the dataset into the cache unless it is there; one process builds, others wait."""
  data_dir = cfg.cache_root() / 'datasets'
  with cache.build_lock(cfg.cache_root(), f'{builder_cls.name}-{config.name}'), _quiet_tfds():
    # Constructed under the lock so that a builder made after another process finished reads the
    # finished dataset's info from disk.
    builder = builder_cls(config=config, data_dir=str(data_dir), file_format='array_record')
    if not builder.is_prepared():
      _log.info('Building %s/%s into %s', builder.name, config.name, data_dir)
      with _removed_on_failure(data_dir, Path(builder.data_dir).parent):
        builder.download_and_prepare()
  return builder


@contextlib.contextmanager
def _removed_on_failure(data_dir: Path, own: Path) -> Iterator[None]:
  """On an exception, removes what the build made in the cache `data_dir` and nothing else:
  whatever appeared in `own`, the config's folder <data_dir>/<builder>/<config> (all of it if it
  appeared: only the build holding the config's lock writes there), then each shared folder
  (the builder's, TFDS's download folders, data_dir) that appeared and is empty again (another
  build may be using it). A failed build left an empty or partial dataset folder behind."""
  shared = [own.parent, data_dir / 'downloads' / 'extracted', data_dir / 'downloads', data_dir]
  existed = {p for p in [own, *shared] if p.exists()}
  before = set(own.iterdir()) if own.is_dir() else set()
  try:
    yield
  except BaseException:
    atomic.remove_added(own, own in existed, before)
    for p in shared:
      if p not in existed:
        with contextlib.suppress(OSError):
          p.rmdir()  # only when empty
    raise


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  """Keeps TFDS's build chatter (stdout banners, progress bars, config warnings) out of the way.

  The CLI prints results on stdout; a TFDS banner there would corrupt them.
  """
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  tfds.disable_progress_bar()
  chatter = io.StringIO()
  try:
    with contextlib.redirect_stdout(chatter):
      yield
  finally:
    absl_logger.setLevel(level)
    if chatter.getvalue().strip():
      _log.info('%s', chatter.getvalue().strip())


def _open_tfds(cfg: DataConfig) -> Corpus:
  """A TFDS catalog dataset, prepared by TFDS (downloads on first use)."""
  name = cfg.tfds_name
  task = glue_tasks.get_task(name) if name.startswith('glue/') else None
  data_dir = cfg.tfds_data_dir or None
  try:
    with _quiet_tfds():
      splits = tfds.data_source(name, data_dir=data_dir, download=True,
                                builder_kwargs={'file_format': 'array_record'})
  except UserError:
    raise
  except Exception as e:  # Offline, unknown name, builder needing TF: all one message.
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise UserError(f'cannot load TFDS dataset {name!r} ({reason}); check the name in the TFDS '
                    'catalog and the network, or prepare it elsewhere with `tfds build '
                    f'{name} --file_format=array_record` and set data.tfds_data_dir') from e
  splits = dict(splits)
  if 'train' not in splits:
    raise UserError(f'TFDS dataset {name!r} has no train split (splits: {sorted(splits)})')
  if task is not None:
    validation = task.tfds_validation
    reader: LmRecords | GlueRecords = GlueRecords(task.tfds_keys)
  else:
    validation = next((s for s in ('validation', 'test') if s in splits), None)
    reader = LmRecords(text_key=cfg.tfds_text_key, has_piece_flags=False)
    sample = splits['train'][0] if len(splits['train']) else {}
    if cfg.tfds_text_key not in sample:
      raise UserError(f'TFDS dataset {name!r} has no feature {cfg.tfds_text_key!r} (features: '
                      f'{sorted(sample)}); set data.tfds_text_key')
  return Corpus(name=f'tfds/{name}', kind='glue' if task else 'lm', splits=splits,
                validation_split=validation if validation in splits else None, reader=reader,
                glue_task=task, location=str(data_dir or 'the TFDS data directory'))


def _as_str(value: Any) -> str:
  return value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value)
