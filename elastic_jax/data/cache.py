"""Cache keys and a cross-process build lock for datasets and tokenizers built on first use."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elastic_jax.errors import UserError


def stable_key(*parts: Any) -> str:
  """A short digest of JSON-able parts: equal options give the same cache entry on any machine."""
  text = json.dumps(parts, sort_keys=True, separators=(',', ':'), default=str)
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]


def file_fingerprint(path: Path) -> tuple[str, int, int]:
  """(path, size, mtime): a changed file gets a new cache entry without hashing its bytes."""
  stat = path.stat()
  return (str(path), stat.st_size, stat.st_mtime_ns)


@contextlib.contextmanager
def build_lock(cache_root: Path, key: str) -> Iterator[None]:
  """Holds an exclusive lock on `key` so processes sharing a cache build each entry once.

  Several training processes on one host start at the same moment and all ask for the same dataset;
  the first builds it while the others wait and then reuse the finished files.
  """
  lock_dir = cache_root / 'locks'
  try:
    lock_dir.mkdir(parents=True, exist_ok=True)
    handle = open(lock_dir / f'{key}.lock', 'w')
  except OSError as e:
    raise UserError(f'cannot write to the data cache {cache_root} ({e.strerror}); set '
                    'data.cache_dir or $ELASTIC_JAX_CACHE to a writable directory') from e
  try:
    fcntl.flock(handle, fcntl.LOCK_EX)
    yield
  finally:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
