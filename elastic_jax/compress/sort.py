"""`elastic-jax sort --workdir W`: sort an imported model's units by importance, in place.

The original (W/pretrained, the largest sub-network) is scored on calibration batches of the
training stream and permuted so that every prefix the space can choose keeps the most important
units; it computes exactly what it computed before. Writes:
  W/sort/scores.npz   the scores (hidden, layers, heads_i, groups_i, ffn_i) of the original's units
                      in their original order
  W/sort/sort.json    method, calibration tokens, permutations, layer ranking, timings (written
                      last: its presence means the sort is done, so a second call does nothing)
Sorting must come before any fine-tuning (checkpoints would hold the unsorted order).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np

from elastic_jax import arch as arch_lib
from elastic_jax import atomic, data
from elastic_jax import export as export_lib
from elastic_jax.compress import config as compress_config
from elastic_jax.compress import importance, permute
from elastic_jax.errors import UserError
from elastic_jax.hf.importer import PRETRAINED, load_fix

SORT_DIR = 'sort'
SCORES_FILE = 'scores.npz'
REPORT_FILE = 'sort.json'
_DENSE_FILES = (export_lib.CONFIG_FILE, export_lib.WEIGHTS_FILE, export_lib.ARCH_FILE)


def pretrained_dir(cfg, workdir) -> Path:
  """The imported original of workdir W (W/pretrained), or one line saying how to get one."""
  init_from = str(cfg.get('train', {}).get('init_from', ''))
  path = Path(init_from) if init_from and not init_from.startswith('hf:') else None
  if path is None or not (path / export_lib.CONFIG_FILE).is_file():
    raise UserError(f'{workdir} holds no imported model (train.init_from={init_from!r}); create '
                    'the workdir with `elastic-jax import-hf --model DIR --out W`')
  return path


def calibration_batches(cfg, n: int) -> list[dict]:
  if n < 1:
    raise UserError(f'config field compress.calibration_batches={n} is invalid: must be >= 1')
  stream = data.train_iterator(cfg.data)
  return [next(stream) for _ in range(n)]


def load_scores(workdir) -> tuple[importance.Scores, dict] | None:
  sort_dir = Path(workdir) / SORT_DIR
  if not (sort_dir / REPORT_FILE).is_file():
    return None
  report = json.loads((sort_dir / REPORT_FILE).read_text())
  with np.load(sort_dir / SCORES_FILE) as f:
    scores = importance.Scores.from_arrays(dict(f), method=report['method'],
                                           layer_method=report['layer_method'],
                                           tokens=report['tokens'])
  return scores, report


def run_sort(cfg, workdir, *, log=print) -> dict:
  """Scores and permutes W's original in place (once); returns the sort report."""
  workdir = Path(workdir)
  done = load_scores(workdir)
  if done is not None:
    log(f'sort: {workdir / SORT_DIR / REPORT_FILE} exists; already sorted')
    return done[1]
  c = compress_config.section(cfg)
  pretrained = pretrained_dir(cfg, workdir)
  own = (workdir / PRETRAINED).resolve()
  if pretrained.resolve() != own:
    # Sorting permutes the original in place: never another run's (a copied workdir's config
    # still names the first one's).
    raise UserError(f'train.init_from={str(pretrained)!r} is not {workdir}\'s own imported model '
                    f'({own}), and sorting rewrites it in place; import into this workdir '
                    '(`elastic-jax import-hf --model DIR --out W`), or, for a copied workdir, set '
                    f'train.init_from and data.tokenizer in {workdir}/config.json to its own '
                    'pretrained/')
  if (workdir / 'checkpoints').is_dir() and any((workdir / 'checkpoints').iterdir()):
    raise UserError(f'{workdir} already holds fine-tuning checkpoints; sort before fine-tuning '
                    '(import into a new workdir, sort, then train)')
  start = time.perf_counter()
  model, saved = export_lib.load(pretrained, fix=load_fix(pretrained))
  if saved.get('source_arch') is None:
    raise UserError(f'{pretrained} records no source_arch; re-import the model')
  batches = calibration_batches(cfg, int(c.calibration_batches))
  tokens = importance.check_calibration(batches, int(c.min_calibration_tokens))
  log(f'sort: scoring {tokens} calibration tokens ({c.importance}, layers by '
      f'{c.layer_importance})')
  scores = importance.compute(model, batches, method=str(c.importance),
                              layer_method=str(c.layer_importance))
  perm = permute.from_scores(scores)
  sorted_model = permute.apply(model, perm)

  sort_dir = workdir / SORT_DIR
  sort_dir.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **scores.to_arrays())
  tmp = sort_dir / f'.{SCORES_FILE}.tmp'
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(sort_dir / SCORES_FILE)
  report = {
      'method': scores.method, 'layer_method': scores.layer_method, 'tokens': tokens,
      'calibration_batches': len(batches),
      'layer_order': permute.layer_order(scores),
      'permutation': {'hidden': perm.hidden.tolist(), 'heads': [p.tolist() for p in perm.heads],
                      'groups': [p.tolist() for p in perm.groups],
                      'ffn': [p.tolist() for p in perm.ffn]},
      'seconds': round(time.perf_counter() - start, 2),
  }
  space_cfg = None
  from elastic_jax.config import space_config  # noqa: PLC0415
  space_cfg = space_config(cfg.space)
  arch = arch_lib.from_json(saved['source_arch'], space_cfg)
  extra = {k: v for k, v in saved.items()
           if k not in ('format', 'elastic_jax_version', 'model', 'dims', 'params', 'source_arch')}
  extra['sorted'] = {k: report[k] for k in ('method', 'layer_method', 'tokens', 'layer_order')}
  files = {p.name: p for p in pretrained.iterdir() if p.is_file() and p.name not in _DENSE_FILES}
  export_lib.save(sorted_model, pretrained, arch=arch, extra=extra, files=files,
                  overwrite=True)  # the imported original, replaced by its sorted self
  atomic.write_text(sort_dir / REPORT_FILE, json.dumps(report) + '\n')
  log(f'sort: done in {report["seconds"]:.1f} s; layers by importance {report["layer_order"]}')
  return report
