"""TFDS builder for the default corpus: the installed Python's own documentation.

It exists on every machine with Python and needs no download, so the main job runs offline. The
text (pydoc help topics plus standard-library docstrings and signatures, about 2 MB) is gathered by
`stdlib_docs_dump.py` in a child process and depends only on the Python build, which is why the
cache key is the Python version and platform.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from elastic_jax.data import cache, documents
from elastic_jax.data.builders import corpus
from elastic_jax.errors import UserError

_DUMP_SCRIPT = Path(__file__).with_name('stdlib_docs_dump.py')


def python_identity() -> str:
  return f'{sys.version} {platform.system()} {platform.machine()}'


def collect_documents() -> list[tuple[str, str]]:
  """[(title, text)] of the Python documentation, gathered in an isolated child process."""
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / 'docs.json'
    # -I -S and a bare environment: no site-packages (a virtual environment's included; their
    # .pth hooks, e.g. setuptools' distutils shim, would change what stdlib imports resolve to)
    # and no environment variables can change what gets imported or end up in the text.
    env = {'PATH': os.defpath, 'LANG': 'C.UTF-8', 'HOME': tmp}
    result = subprocess.run([sys.executable, '-I', '-S', str(_DUMP_SCRIPT), str(out)], cwd=tmp,
                            env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0 or not out.exists():
      last = (result.stderr.strip().splitlines() or ['no output'])[-1]
      raise UserError(f'could not gather the Python documentation corpus ({last}); use another '
                      "data.source such as 'text_files'")
    return [(title, text) for title, text in json.loads(out.read_text(encoding='utf-8'))]


class PythonDocsConfig(corpus.PieceCorpusConfig):

  def __init__(self, *, validation_fraction: float):
    key = cache.stable_key(python_identity(), validation_fraction, documents.MAX_PIECE_CHARS,
                           'stdlib-only-v2')
    version = f'py{sys.version_info.major}{sys.version_info.minor}'
    super().__init__(name=f'{version}-{key}', validation_fraction=validation_fraction,
                     description=f'Python {platform.python_version()} documentation: pydoc help '
                                 'topics and standard-library docstrings')


class PythonDocs(corpus.PieceCorpusBuilder, skip_registration=True):
  """The installed Python's documentation as a TFDS dataset (file_format='array_record')."""

  name = 'python_docs'

  def _corpus_name(self) -> str:
    return 'the Python documentation corpus'

  def _pieces(self) -> Iterator[documents.Piece]:
    if not hasattr(self, '_documents'):
      self._documents = collect_documents()  # Gathered once; _pieces runs once per split too.
    for title, text in self._documents:
      yield from documents.document_pieces(title, text)
