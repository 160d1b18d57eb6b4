"""After training: every f-gram's embedding precomputed into a memory-mapped table on the host.

SCONE's inference never runs the f-gram model: its outputs for all S f-grams are computed once
(batched, jitted) and kept off the accelerator; each batch looks its rows up on the host and only
the gathered rows [B, T, hidden] go to the device (`fgram_emb`, `fgram_ids` in the batch; the
model substitutes them exactly where training computed them, `Model.fgram_inputs`).

A table directory holds
  table.npy   float32 [S, hidden], read with `np.load(mmap_mode='r')` (pages in only rows used);
  index.npz   the f-grams (`Fgrams.save`): the row order, i.e. the hash index is rebuilt from it;
  table.json  shape, the sha256 of table.npy, and the fingerprint of the run: sha256 of the
              f-gram list, the main model's token embedding, the f-gram model's parameters and
              the active hidden width, so a table can only be used with the weights it came from.
table.json is written last (each file under a temporary name, then renamed): a directory without
it is an unfinished table. Elastic dimensions: the f-gram model reads the sub-network's masked
token embeddings and runs at the sub-network's f-gram model size, so a table belongs to one
(hidden width, f-gram layers, f-gram FFN width) of an `arch` (default the largest); the f-gram
count needs no table of its own: a sub-network using the first c f-grams reads the first c rows
(`Table(batch, n_used=c)`, or `truncated(c)` for an export).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elastic_jax.errors import UserError
from elastic_jax.model.layers import prefix_mask
from elastic_jax.scone.fgrams import Fgrams
from elastic_jax.scone.lookup import FgramIndex, longest
from elastic_jax.scone.model import FORMULA, elastic_size, fgram_embeddings

TABLE, INDEX, META = 'table.npy', 'index.npz', 'table.json'


def _hidden_mask(model, arch):
  if arch is None:
    return None, model.dims.hidden
  h = int(arch.hidden)
  return prefix_mask(model.dims.hidden, h, jnp.dtype(model.cfg.dtype)), h


def table_size(model, arch=None) -> tuple[int, int, int]:
  """(hidden, f-gram layers, f-gram FFN width) a table is computed for."""
  layers, ffn = elastic_size(model.scone, arch)
  full = (len(model.scone.blocks), model.scone.blocks[0].mlp.ffn if model.scone.blocks else 1)
  return (_hidden_mask(model, arch)[1], int(full[0] if layers is None else layers),
          int(full[1] if ffn is None else ffn))


def _hash_arrays(h, arrays) -> None:
  for a in arrays:
    a = np.asarray(jax.device_get(a[...] if isinstance(a, nnx.Variable) else a), np.float32)
    h.update(str(a.shape).encode())
    h.update(a.tobytes())


def _embedding_arrays(model) -> list:
  embed = model.embed
  return [getattr(embed, n) for n in ('tokens', 'proj', 'proj_bias')
          if getattr(embed, n, None) is not None]


def export_fingerprint(dense, fgrams: Fgrams) -> str:
  """Ties an exported sub-network's table to its f-grams and its own token embedding (an export
  holds no f-gram model: the table is what is left of it)."""
  h = hashlib.sha256(b'export:' + fgrams.digest().encode())
  h.update(str(dense.dims.hidden).encode())
  _hash_arrays(h, _embedding_arrays(dense))
  return h.hexdigest()


def fingerprint(model, fgrams: Fgrams, arch=None) -> str:
  """Ties a table to the weights and f-grams of one run (and one hidden width and f-gram model
  size; the largest sub-network's when `arch` is None), and to the f-gram model's output formula
  (a table computed by another version of it is refused)."""
  h = hashlib.sha256(fgrams.digest().encode())
  h.update(FORMULA.encode())
  hidden, layers, ffn = table_size(model, arch)
  h.update(str(hidden).encode())
  if (layers, ffn) != table_size(model)[1:]:  # the largest's fingerprint is as before
    h.update(f'fgram_layers={layers},fgram_ffn={ffn}'.encode())
  _hash_arrays(h, _embedding_arrays(model) + jax.tree.leaves(nnx.state(model.scone, nnx.Param)))
  return h.hexdigest()


@functools.partial(jax.jit, static_argnums=0)
def _rows(graphdef, state, tokens_NK, lengths_N, hidden_mask, arch):
  model = nnx.merge(graphdef, state)
  return fgram_embeddings(model.scone, model.embed.token_vectors, tokens_NK, lengths_N,
                          hidden_mask, arch).astype(jnp.float32)


def precompute(model, fgrams: Fgrams, *, arch=None, batch: int = 1024) -> np.ndarray:
  """float32 [S, hidden]: the f-gram model's output for every f-gram (for `arch`'s hidden width
  and f-gram model size, zeros beyond its hidden width), `batch` rows per call (the last call
  padded, so one compilation serves all)."""
  if model.scone is None:
    raise UserError('this model has no f-gram model (scone.enabled is False)')
  if fgrams.max_n != model.scone.k:
    raise UserError(f'the f-grams have K={fgrams.max_n} but the f-gram model was built for '
                    f'K={model.scone.k} (scone.max_n)')
  graphdef, state = nnx.split(model)
  mask, _ = _hidden_mask(model, arch)
  s = len(fgrams)
  out = np.zeros((s, model.dims.hidden), np.float32)
  for start in range(0, s, batch):
    tokens = np.zeros((batch, fgrams.max_n), np.int32)
    lengths = np.ones(batch, np.int32)
    stop = min(start + batch, s)
    tokens[:stop - start] = fgrams.tokens_SK[start:stop]
    lengths[:stop - start] = fgrams.lengths_S[start:stop]
    rows = _rows(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), mask, arch)
    out[start:stop] = np.asarray(rows)[:stop - start]
  return out


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def save(directory: str | Path, table_SD: np.ndarray, fgrams: Fgrams, run_fingerprint: str) -> Path:
  """Writes the table directory (see the module docstring); returns it."""
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  (d / META).unlink(missing_ok=True)  # the old table is invalid from here on
  tmp = d / (TABLE + '.tmp')
  with open(tmp, 'wb') as f:
    np.save(f, np.ascontiguousarray(table_SD, np.float32))
  os.replace(tmp, d / TABLE)
  fgrams.save(d / INDEX)
  meta = {'fingerprint': run_fingerprint, 'rows': int(table_SD.shape[0]),
          'hidden': int(table_SD.shape[1]), 'dtype': 'float32', 'max_n': fgrams.max_n,
          'sha256': _sha256(d / TABLE), 'bytes': int((d / TABLE).stat().st_size),
          'fgrams_sha256': fgrams.digest()}
  tmp = d / (META + '.tmp')
  tmp.write_text(json.dumps(meta, indent=1))
  os.replace(tmp, d / META)
  return d


@dataclasses.dataclass
class Table:
  """A loaded table: rows (memory-mapped), its f-grams and their index; `n_used` (None: all) is
  the f-gram count of the sub-network it serves."""

  rows_SD: np.ndarray
  fgrams: Fgrams
  index: FgramIndex
  meta: dict
  n_used: int | None = None

  @property
  def nbytes(self) -> int:
    return int(self.rows_SD.nbytes)

  def __call__(self, batch: dict, n_used: int | None = None) -> dict:
    """The batch plus `fgram_ids` int32 [B, T] (longest match among the first `n_used`
    f-grams, default `self.n_used`; -1 = none) and `fgram_emb` float32 [B, T, hidden] (zeros
    where none): the rows gathered from the table, all the device receives of it."""
    hits = self.index.hits(batch['tokens'], batch.get('positions'), batch.get('segment_ids'))
    ids = longest(hits, self.n_used if n_used is None else n_used)
    emb = np.zeros(ids.shape + (self.rows_SD.shape[1],), np.float32)
    on = ids >= 0
    emb[on] = self.rows_SD[ids[on]]
    return {**batch, 'fgram_ids': ids, 'fgram_emb': emb}

  def truncated(self, hidden: int | None = None) -> Table:
    """The table a sub-network carries: its first `n_used` rows (the f-gram count; every prefix
    of the frequency order is closed under suffixes, so its own longest match is the longest
    among them) and its first `hidden` columns (beyond the active width the rows are zeros)."""
    c = len(self.fgrams) if self.n_used is None else min(self.n_used, len(self.fgrams))
    hidden = self.rows_SD.shape[1] if hidden is None else hidden
    f = self.fgrams
    fgrams = Fgrams(f.tokens_SK[:c], f.lengths_S[:c], f.counts_S[:c], f.min_count)
    return Table(np.ascontiguousarray(self.rows_SD[:c, :hidden]), fgrams, FgramIndex(fgrams),
                 dict(self.meta))


def _load_index(d: Path, fix: str) -> Fgrams:
  try:
    return Fgrams.load(d / INDEX)
  except UserError:
    raise UserError(f'the SCONE table index {d / INDEX} is missing or corrupt; {fix}') from None


def load(directory: str | Path, run_fingerprint: str | None = None, *,
         verify: bool = True, fix: str | None = None) -> Table:
  """Opens a table directory; UserError (one line) if it is missing, unfinished, corrupt
  (`verify` re-hashes table.npy) or from another run (fingerprint differs)."""
  d = Path(directory)
  fix = fix or 'precompute it again for this run (elastic_jax.scone.table.precompute + save)'
  if not (d / META).is_file():
    raise UserError(f'no SCONE table in {d} (table.json missing: absent or unfinished); {fix}')
  try:
    meta = json.loads((d / META).read_text())
    expected = (meta['rows'], meta['hidden'])
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'the SCONE table {d} is corrupt (table.json: {e}); {fix}') from None
  if run_fingerprint is not None and meta.get('fingerprint') != run_fingerprint:
    raise UserError(f'the SCONE table {d} was built from another run (fingerprint '
                    f'{str(meta.get("fingerprint"))[:12]} != {run_fingerprint[:12]} of these '
                    f'weights and f-grams); {fix}')
  try:
    if verify and _sha256(d / TABLE) != meta.get('sha256'):
      raise ValueError('its sha256 differs from table.json')
    rows = np.load(d / TABLE, mmap_mode='r')
    if rows.shape != tuple(expected) or rows.dtype != np.float32:
      raise ValueError(f'shape {rows.shape} {rows.dtype}, table.json says {tuple(expected)}')
  except (OSError, ValueError) as e:
    raise UserError(f'the SCONE table {d / TABLE} is corrupt ({e}); {fix}') from None
  fgrams = _load_index(d, fix)
  if meta.get('fgrams_sha256', fgrams.digest()) != fgrams.digest():
    raise UserError(f'the SCONE table {d} is corrupt ({INDEX} holds other f-grams than the '
                    f'table was computed for); {fix}')
  if len(fgrams) != expected[0]:
    raise UserError(f'the SCONE table {d} is corrupt (index has {len(fgrams)} f-grams, the '
                    f'table {expected[0]} rows); {fix}')
  return Table(rows, fgrams, FgramIndex(fgrams), meta)


EXPORT_DIR = 'scone_table'  # an exported SCONE sub-network's table, beside its weights


def save_for_export(export_dir: str | Path, table: Table, dense) -> Path:
  """Writes a sub-network's own (truncated) table into its export directory (which
  `export.save` writes under a temporary name and renames whole)."""
  if table.rows_SD.shape[1] != dense.dims.hidden:
    raise ValueError(f'table rows of width {table.rows_SD.shape[1]} for a model of hidden '
                     f'{dense.dims.hidden}; truncate it to the sub-network first')
  return save(Path(export_dir) / EXPORT_DIR, table.rows_SD, table.fgrams,
              export_fingerprint(dense, table.fgrams))


def load_for_export(export_dir: str | Path, dense, config: dict | None = None) -> Table | None:
  """The table of an exported SCONE sub-network (None when the export is not one; `config`: its
  config.json, read when None), checked against the exported weights; UserError (one line) when
  it is missing, corrupt or another's."""
  if config is None:
    try:
      config = json.loads((Path(export_dir) / 'config.json').read_text())
    except (OSError, ValueError):
      return None  # not a native export (export.load_any has read it already)
  if not isinstance(config, dict) or not config.get('scone'):
    return None
  d = Path(export_dir) / EXPORT_DIR
  if not (d / INDEX).is_file():
    raise UserError(f'{export_dir} is a SCONE sub-network but its table {d} is missing or '
                    'unfinished; export it again (`elastic-jax export`)')
  fgrams = _load_index(d, 'export the sub-network again')
  table = load(d, export_fingerprint(dense, fgrams), fix='export the sub-network again')
  if table.rows_SD.shape[1] != dense.dims.hidden:
    raise UserError(f'the SCONE table {d} has rows of width {table.rows_SD.shape[1]}, the model '
                    f'hidden {dense.dims.hidden}; export it again')
  return table
