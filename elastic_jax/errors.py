"""The one exception type for bad user input.

Every check of a config value, file, architecture or checkpoint raises `UserError` with a message
that names what is wrong and how to fix it. The CLI turns it into one line on stderr and exit
code 2; library users catch it like any other exception. `read_json` reads the JSON files users
point at (configs, exports, search results) with the same two errors everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path


class UserError(ValueError):
  """Bad input from the user: a config value, a file, an architecture, a checkpoint."""


def read_json(path: str | Path, missing: str, fix: str = ''):
  """The JSON value in `path`. A UserError with the message `missing` when there is no such file,
  and one naming the parse error (then `fix`, how to repair it) when it is not valid JSON."""
  path = Path(path)
  if not path.is_file():
    raise UserError(missing)
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON ({e})' + (f'; {fix}' if fix else '')) from None
