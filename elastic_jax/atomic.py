"""The one atomic writer: files and directories appear whole under their final name, or not at all.

Everything is written to a hidden temporary name beside the target and renamed into place (a
rename within one directory is atomic on POSIX), so a crash, a full disk or Ctrl-C never leaves a
half-written file under the real name. Files and directories get the permissions an ordinary
`open()` / `mkdir()` would give under the user's umask (`tempfile` makes them private, 0600 /
0700, which would stop the rest of a group from reading a shared workdir).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
  mask = os.umask(0)  # the only portable way to read it: set, then restore at once
  os.umask(mask)
  return mask


def _public(path: Path, is_dir: bool) -> None:
  """Gives `path` the mode open()/mkdir() would have given it under the user's umask."""
  os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = 'w', **kwargs) -> Iterator[IO]:
  """`with open_atomic(p, 'wb') as f: ...` writes p whole when the block ends without error."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    _public(Path(tmp), is_dir=False)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def write_text(path: str | Path, text: str) -> Path:
  with open_atomic(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
  with open_atomic(path, 'wb') as f:
    f.write(data)
  return Path(path)


def write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
  """Runs `write(tmp_path)` (for writers that want a file name, e.g. `savefig`), then renames the
  file to `path`. The temporary name keeps `path`'s suffix, which some writers read."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.stem}.tmp-', suffix=path.suffix, dir=path.parent)
  os.close(fd)
  try:
    write(Path(tmp))
    _public(Path(tmp), is_dir=False)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path


def write_dir(out: str | Path, write: Callable[[Path], None], *, replace: bool = False) -> Path:
  """Runs `write(tmp_dir)`, then renames tmp_dir to `out`.

  An existing `out` is replaced only with `replace=True` (the caller decides whether what is there
  may go: see `export.check_out`); otherwise FileExistsError. The old directory is moved aside
  before the new one is renamed in, and deleted after, so `out` is always either the old or the
  new directory, never a mixture.
  """
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
  try:
    _public(tmp, is_dir=True)
    write(tmp)
    for f in tmp.rglob('*'):  # some writers (safetensors) create private files too
      if not f.is_symlink():
        _public(f, is_dir=f.is_dir())
    if out.exists() or out.is_symlink():
      if not replace:
        raise FileExistsError(f'{out} exists')
      old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
      os.replace(out, old / out.name)
      os.replace(tmp, out)
      shutil.rmtree(old)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def remove_added(directory: Path, existed: bool, before: set[Path]) -> None:
  """Undoes what a failed step added to `directory`: all of it if it did not exist (`existed`),
  else the entries not in `before` (its listing when the step began); nothing else."""
  if not existed:
    shutil.rmtree(directory, ignore_errors=True)
  elif directory.is_dir():
    for p in set(directory.iterdir()) - before:
      if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
      else:
        p.unlink(missing_ok=True)
