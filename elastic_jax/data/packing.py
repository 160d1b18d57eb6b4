"""Concatenate-and-split packing of variable-length documents into fixed-length rows.

Why not grain's `ConcatThenSplitIterDataset`: its iterator state does not survive the JSON round
trip that checkpointing uses (a (-1, -1) "no remainder" tuple comes back as a list, and a restored
iterator then repeats a document), and it costs a Python-level buffer per element. This packer's
state is plain JSON: the parent's state before the current chunk of documents, the document's index
in that chunk and the tokens of it already emitted.

The parent yields *chunks* (lists) of documents rather than single documents so records can be read
from array_record in batches, several times faster than one at a time.

Rows are filled completely (no padding) until the parent runs out, so only the very last row of a
finite stream is padded. A document that does not fit continues in the next row as a new segment
whose positions restart at 0, since attention never crosses rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
  """Packs chunks of documents (dicts of equal-length int arrays) into rows of `seq_len`.

  Each output row has the packed features (padded with `pad_values`), plus
  `segment_ids` int32[seq_len] (1, 2, ... per document piece in the row, 0 = padding) and
  `positions` int32[seq_len] (0-based position within its piece, 0 at padding).
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_values: Mapping[str, int]):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_values = dict(pad_values)

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), seq_len=self._seq_len,
                         pad_values=self._pad_values)

  def __str__(self) -> str:
    return f'PackIterDataset(seq_len={self._seq_len})'


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_values: dict[str, int]):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_values = pad_values
    self._key = next(iter(pad_values))  # any feature: all have the document's length
    self._arange = np.arange(seq_len, dtype=np.int32)
    self._chunk: Sequence[Mapping[str, np.ndarray]] | None = None
    self._chunk_parent_state: dict[str, Any] | None = None  # parent state before the chunk
    self._doc_index = 0  # document of the chunk being consumed
    self._offset = 0  # its tokens already emitted (right after a restore: to skip)

  def __next__(self) -> dict[str, np.ndarray]:
    row = {k: np.full(self._seq_len, v, np.int32) for k, v in self._pad_values.items()}
    segment_ids = np.zeros(self._seq_len, np.int32)
    positions = np.zeros(self._seq_len, np.int32)
    filled = 0
    segment = 0
    while filled < self._seq_len:
      doc = self._current_document()
      if doc is None:
        break
      take = min(len(doc[self._key]) - self._offset, self._seq_len - filled)
      end = filled + take
      for key, values in doc.items():
        row[key][filled:end] = values[self._offset:self._offset + take]
      segment += 1
      segment_ids[filled:end] = segment
      positions[filled:end] = self._arange[:take]
      filled = end
      self._offset += take
    if filled == 0:
      raise StopIteration
    row['segment_ids'] = segment_ids
    row['positions'] = positions
    return row

  def _current_document(self) -> Mapping[str, np.ndarray] | None:
    """The first document, from the current position on, with tokens left; None at the end."""
    while True:
      if self._chunk is None:
        state = self._parent.get_state()
        try:
          self._chunk = next(self._parent)
        except StopIteration:
          return None
        self._chunk_parent_state = state
      if self._doc_index >= len(self._chunk):
        self._chunk = None
        self._doc_index = self._offset = 0
        continue
      doc = self._chunk[self._doc_index]
      if self._offset < len(doc[self._key]):
        return doc
      self._doc_index += 1
      self._offset = 0

  def get_state(self) -> dict[str, Any]:
    parent = self._parent.get_state() if self._chunk is None else self._chunk_parent_state
    return {'parent': parent, 'doc': self._doc_index, 'offset': self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._chunk = None
    self._chunk_parent_state = None
    self._doc_index = int(state['doc'])  # Applied to the next chunk fetched.
    self._offset = int(state['offset'])
