"""Base class for TFDS builders whose data are local files."""

from __future__ import annotations

import logging

import tensorflow_datasets as tfds


class _DropCustomConfigWarning(logging.Filter):
  """Silences TFDS's warning about configs made at run time: ours always are (keyed by the files).

  TFDS would print it on every construction, in every grain worker, though nothing is wrong.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Using custom data configuration')


logging.getLogger('absl').addFilter(_DropCustomConfigWarning())


class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder with nothing to download, hence no code directory or URL checksums to look up.

  TFDS looks for a checksums file next to a builder's code, and on Python >= 3.9 that lookup
  imports `importlib_resources`, which TFDS does not install; local builders have no checksums, so
  they say so (None is TFDS's own "no checksums" answer) and build without that package.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None
