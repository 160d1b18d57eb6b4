"""Base TFDS builder for plain-text corpora stored as document pieces (see `documents.py`)."""

from __future__ import annotations

import abc
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from elastic_jax.data import documents
from elastic_jax.data.builders import local


class PieceCorpusConfig(tfds.core.BuilderConfig):
  """Options shared by every piece corpus; subclasses add where the text comes from."""

  def __init__(self, *, name: str, validation_fraction: float, description: str = ''):
    super().__init__(name=name, description=description)
    self.validation_fraction = validation_fraction


class PieceCorpusBuilder(local.LocalFilesBuilder, skip_registration=True):
  """Writes 'train' and 'validation' splits of {text, bos, eos, source} records.

  Subclasses only say how to read the corpus (`_pieces`); the split, the features and the record
  order (stored order = corpus order, so runs never depend on TFDS's write-time shuffle) are common.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  @abc.abstractmethod
  def _pieces(self) -> Iterator[documents.Piece]:
    """Yields the corpus's pieces in a deterministic order; called once per split plus once."""

  def _corpus_name(self) -> str:
    return f'{self.name} corpus'

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'bos': np.bool_,
            'eos': np.bool_,
            'source': tfds.features.Text(),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            validation_fraction=self.builder_config.validation_fraction,
            max_piece_chars=documents.MAX_PIECE_CHARS),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    fraction = self.builder_config.validation_fraction
    splits = documents.split_pieces(self._pieces, fraction, self._corpus_name())
    if fraction == 0:  # TFDS cannot write an empty split; no split means no validation data.
      del splits['validation']
    return {name: self._generate_examples(gen) for name, gen in splits.items()}

  def _generate_examples(self, gen):
    for index, piece in gen():
      yield index, {'text': piece.text, 'bos': piece.bos, 'eos': piece.eos, 'source': piece.source}
