"""SCONE in a training run: the run's f-grams (extracted once, saved, reused on resume), the
lookup transform for its batches, and the table precomputed at the end.

Files in the workdir W:
  W/scone/fgrams.npz   the f-grams of the training split (fgrams.py), written before step 1;
                       a resumed run reads them back, so its batches match the checkpoint's.
  W/scone/table/       the precomputed embedding table of the final weights (table.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from elastic_jax import data
from elastic_jax.errors import UserError
from elastic_jax.scone import table as table_lib
from elastic_jax.scone.config import SconeConfig
from elastic_jax.scone.fgrams import Fgrams, extract
from elastic_jax.scone.lookup import AddFgramHits, FgramIndex

FGRAMS = Path('scone') / 'fgrams.npz'
TABLE_DIR = Path('scone') / 'table'


def run_fgrams(scfg: SconeConfig, data_cfg, workdir: str | Path, *, write: bool = True,
               log=None) -> Fgrams:
  """The run's f-grams: W/scone/fgrams.npz if it exists (resume), else extracted from the
  training split (and saved when `write`, i.e. on the main process)."""
  path = Path(workdir) / FGRAMS
  if path.is_file():
    fgrams = Fgrams.load(path)
    if (fgrams.max_n, fgrams.min_count) != (scfg.max_n, scfg.min_count) \
        or len(fgrams) > scfg.num_fgrams:
      raise UserError(f'{path} holds f-grams with max_n={fgrams.max_n}, min_count='
                      f'{fgrams.min_count}, {len(fgrams)} f-grams, but the config asks for '
                      f'scone.max_n={scfg.max_n}, scone.min_count={scfg.min_count}, '
                      f'scone.num_fgrams={scfg.num_fgrams}; use the run\'s own scone settings '
                      'or a new workdir')
    return fgrams
  if data.DataConfig.from_config(data_cfg).task == 'glue':
    raise UserError('SCONE (scone.enabled) needs a language-modelling data.task')
  fgrams = extract(data.train_documents(data_cfg), max_n=scfg.max_n, min_count=scfg.min_count,
                   num_fgrams=scfg.num_fgrams)
  if not len(fgrams):
    raise UserError(f'no n-gram of the training split occurs scone.min_count={scfg.min_count} '
                    'times; lower scone.min_count or use more data')
  if log is not None:
    log(f'SCONE: {len(fgrams):,} f-grams (n = 2..{scfg.max_n}, count >= {scfg.min_count})')
  if write:
    fgrams.save(path)
  return fgrams


def batch_transform(fgrams: Fgrams) -> AddFgramHits:
  return AddFgramHits(FgramIndex(fgrams))


def write_table(model, fgrams: Fgrams, workdir: str | Path, scfg: SconeConfig) -> Path:
  """Precomputes the final weights' table into W/scone/table (largest hidden width)."""
  rows = table_lib.precompute(model, fgrams, batch=scfg.table_batch)
  return table_lib.save(Path(workdir) / TABLE_DIR, rows, fgrams,
                        table_lib.fingerprint(model, fgrams))


def inference_table(model, scfg: SconeConfig, data_cfg, workdir: str | Path,
                    arch=None) -> table_lib.Table:
  """The table inference reads for `arch` (its f-gram count as `n_used`): W/scone/table, checked
  against these weights, when the arch's hidden width and f-gram model size are the largest
  (or `arch` is None); else the sub-network's own rows, computed now and kept in memory."""
  fgrams = run_fgrams(scfg, data_cfg, workdir, write=False)
  n_used = int(arch.fgrams) or None if arch is not None else None
  if table_lib.table_size(model, arch) == table_lib.table_size(model):
    table = table_lib.load(Path(workdir) / TABLE_DIR, table_lib.fingerprint(model, fgrams))
  else:
    rows = table_lib.precompute(model, fgrams, arch=arch, batch=scfg.table_batch)
    table = table_lib.Table(rows, fgrams, FgramIndex(fgrams),
                            {'fingerprint': table_lib.fingerprint(model, fgrams, arch)})
  return dataclasses.replace(table, n_used=n_used)


def export_table(model, scfg: SconeConfig, data_cfg, workdir: str | Path,
                 arch) -> table_lib.Table:
  """The table an exported sub-network carries: its own rows (its hidden width and f-gram model
  size) of its first `arch.fgrams` f-grams."""
  return inference_table(model, scfg, data_cfg, workdir, arch).truncated(int(arch.hidden))


def export_table_of_run(cfg, model, workdir: str | Path | None, arch) -> table_lib.Table | None:
  """`export_table` for a run whose config enables SCONE, else None."""
  from elastic_jax.scone.config import scone_config  # noqa: PLC0415
  scfg = scone_config(cfg.get('scone'))
  if scfg is None:
    return None
  if not workdir:
    raise UserError('exporting a SCONE sub-network needs the --workdir of its run (its f-grams '
                    'and table)')
  return export_table(model, scfg, cfg.data, workdir, arch)
