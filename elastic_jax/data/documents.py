"""Turning raw text into documents, documents into pieces, and pieces into train/validation splits.

Shared by the corpus builders (local text files, the Python documentation) so they split text the
same way. A *piece* is the unit stored, shuffled and sharded: a whole document, or a slice of a long
one. Cutting long documents lets a one-file corpus (tinyshakespeare as a single document) still be
shuffled, sharded across processes and split into train/validation; `bos`/`eos` record whether a
piece starts/ends its document so the pipelines frame documents, not pieces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator

from elastic_jax.errors import UserError

# Long enough that a cut rarely falls inside a training row (rows are at most a few thousand
# tokens), short enough that a 1 MB file still yields ~100 pieces to shuffle and shard.
MAX_PIECE_CHARS = 8192

_BLANK_LINE = re.compile(r'\n(?:[ \t\r\f\v]*\n)+')


@dataclasses.dataclass(frozen=True)
class Piece:
  text: str
  bos: bool  # the piece starts its document
  eos: bool  # the piece ends its document
  source: str  # where it came from (file name, module name), for people reading the data


def split_documents(text: str, boundary: str) -> list[str]:
  """Splits a file's text into documents at 'file', 'blank_line' or 'line' boundaries.

  Documents that are only whitespace are dropped; no other character is changed, so the documents
  of a 'file' split are exactly the files.
  """
  if boundary == 'file':
    docs = [text]
  elif boundary == 'blank_line':
    docs = [d.strip('\r\n') for d in _BLANK_LINE.split(text)]
  elif boundary == 'line':
    docs = [line.rstrip('\r') for line in text.split('\n')]
  else:
    raise UserError(f"doc_boundary is {boundary!r}; use 'file', 'blank_line' or 'line'")
  return [d for d in docs if d.strip()]


def cut_pieces(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
  """Cuts `text` into pieces of at most `max_chars`, after a newline (else a space) when possible.

  ''.join(cut_pieces(text)) == text.
  """
  pieces = []
  start = 0
  while len(text) - start > max_chars:
    window = text[start:start + max_chars]
    cut = window.rfind('\n') + 1 or window.rfind(' ') + 1 or max_chars
    pieces.append(text[start:start + cut])
    start += cut
  pieces.append(text[start:])
  return pieces


def document_pieces(source: str, document: str, max_chars: int = MAX_PIECE_CHARS) -> list[Piece]:
  parts = cut_pieces(document, max_chars)
  return [Piece(text=p, bos=i == 0, eos=i == len(parts) - 1, source=source)
          for i, p in enumerate(parts)]


def _piece_rank(piece: Piece) -> bytes:
  return hashlib.sha256(piece.text.encode('utf-8', errors='replace')).digest()


def validation_indices(pieces: Iterable[Piece], fraction: float, corpus_name: str) -> set[int]:
  """The indices of the pieces held out for validation: a fixed share chosen by content hash.

  Ranking by a hash of the text makes the split independent of file order and machine, keeps a
  piece in the same split when other files are added, and sends duplicates to the same split.
  """
  ranked = sorted((_piece_rank(p), i) for i, p in enumerate(pieces))
  count = len(ranked)
  if count == 0:
    raise UserError(f'{corpus_name} has no text: every document is empty or whitespace')
  if fraction == 0:
    return set()
  num_validation = max(1, round(count * fraction))
  if num_validation >= count:
    raise UserError(f'{corpus_name} has only {count} document piece(s), too few to hold out '
                    f'validation_fraction={fraction}; add text, use doc_boundary '
                    "'blank_line' or 'line', or set data.validation_fraction=0")
  return {i for _, i in ranked[:num_validation]}


def split_pieces(pieces_fn: Callable[[], Iterator[Piece]], fraction: float,
                 corpus_name: str) -> dict[str, Callable[[], Iterator[tuple[int, Piece]]]]:
  """Returns {'train': gen, 'validation': gen} yielding (index, piece) of each split.

  Takes a function that re-reads the corpus rather than a list, so a large corpus is streamed twice
  (once to rank, once per split to write) instead of being held in memory.
  """
  held_out = validation_indices(pieces_fn(), fraction, corpus_name)

  def generate(in_validation: bool) -> Iterator[tuple[int, Piece]]:
    for i, piece in enumerate(pieces_fn()):
      if (i in held_out) == in_validation:
        yield i, piece

  return {'train': lambda: generate(False), 'validation': lambda: generate(True)}
