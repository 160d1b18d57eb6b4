"""TFDS builder for local plain-text files: documents at file, blank-line or line boundaries."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from elastic_jax.data import cache, documents
from elastic_jax.data.builders import corpus
from elastic_jax.errors import UserError


def resolve_files(patterns: Sequence[str]) -> list[Path]:
  """Expands files and globs into a sorted, de-duplicated list of existing files."""
  files: set[Path] = set()
  for pattern in patterns:
    expanded = os.path.expanduser(pattern)
    if glob.has_magic(expanded):
      matches = [Path(m) for m in glob.glob(expanded, recursive=True) if Path(m).is_file()]
      if not matches:
        raise UserError(f'data.paths: no file matches {pattern!r}; check the pattern')
      files.update(m.resolve() for m in matches)
    else:
      path = Path(expanded)
      if path.is_dir():
        raise UserError(f"data.paths: {pattern!r} is a directory; give files or a glob such as "
                        f"'{pattern.rstrip('/')}/*.txt'")
      if not path.is_file():
        raise UserError(f'data.paths: {pattern!r} does not exist; check the path')
      files.add(path.resolve())
  return sorted(files)


def read_text(path: Path, errors: str = 'strict') -> str:
  """A file's text as UTF-8; with errors='strict', UserError naming the first invalid byte."""
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror}') from e
  try:
    return raw.decode('utf-8', errors=errors)
  except UnicodeDecodeError as e:
    raise UserError(f'{path} is not UTF-8 text: byte offset {e.start} ({raw[e.start]:#04x}) '
                    f'{e.reason}; convert the file to UTF-8, or set data.encoding_errors='
                    "'replace' to read such bytes as U+FFFD") from None


class TextFilesConfig(corpus.PieceCorpusConfig):
  """Which files, and where documents end. The name keys the cache on files, sizes and mtimes."""

  def __init__(self, *, files: Sequence[Path], doc_boundary: str, validation_fraction: float,
               encoding_errors: str = 'strict'):
    self.files = tuple(Path(f) for f in files)
    self.doc_boundary = doc_boundary
    self.encoding_errors = encoding_errors
    key = cache.stable_key([cache.file_fingerprint(f) for f in self.files], doc_boundary,
                           validation_fraction, documents.MAX_PIECE_CHARS,
                           *([] if encoding_errors == 'strict' else [encoding_errors]))
    super().__init__(name=f'{doc_boundary}-{key}', validation_fraction=validation_fraction,
                     description=f'{len(self.files)} local text file(s), one document per '
                                 f'{doc_boundary.replace("_", " ")}')


class TextFiles(corpus.PieceCorpusBuilder, skip_registration=True):
  """Local text files as a TFDS dataset (build with file_format='array_record')."""

  name = 'text_files'

  def _corpus_name(self) -> str:
    files = self.builder_config.files
    return f'the text files ({files[0]}{" and others" if len(files) > 1 else ""})'

  def _pieces(self) -> Iterator[documents.Piece]:
    for path in self.builder_config.files:
      text = read_text(path, self.builder_config.encoding_errors)
      for doc in documents.split_documents(text, self.builder_config.doc_boundary):
        yield from documents.document_pieces(path.name, doc)
