"""A run's working directory: its config, its supernet, and what later commands find there.

Layout of W:
  config.json       the experiment config (ConfigDict as JSON), written by the first command
  checkpoints/      Orbax checkpoints of supernet training (see `elastic_jax/checkpoints.py`)
  checkpoints_unreadable/  checkpoints a training run could not read, moved aside for inspection
  space_history.json  how training changed the space (ELM's dynamic modules), if it did
  search/           search outputs (pareto.json, history.jsonl, pareto.png, ...)
  export/           exported dense models

Commands given `--workdir W` without `--config` read W/config.json. A workdir without a trained
supernet uses the config's seeded initialisation, so every command works before training exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_collections
from flax import nnx

from elastic_jax import atomic, checkpoints, space_history
from elastic_jax.config import check_compatible, model_config, space_config
from elastic_jax.errors import UserError, read_json
from elastic_jax.model.layers import abstract_params
from elastic_jax.model.supernet import Model
from elastic_jax.scone.config import scone_config, with_scone_choices
from elastic_jax.space import Space

CONFIG_FILE = 'config.json'


def save_config(workdir: str | Path, cfg: ml_collections.ConfigDict) -> None:
  atomic.write_text(Path(workdir) / CONFIG_FILE, cfg.to_json_best_effort(indent=2) + '\n')


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / CONFIG_FILE
  saved = read_json(path, f'workdir {workdir} has no {CONFIG_FILE}; pass --config=configs/X.py',
                    'pass --config=configs/X.py')
  for section in ('model', 'space', 'data'):  # what every command on a workdir reads
    if not isinstance(saved, dict) or not isinstance(saved.get(section), dict):
      raise UserError(f'{path} has no {section!r} section (every run writes one: was the file '
                      'edited?); restore it, or pass --config=configs/X.py with the run\'s config')
  return ml_collections.ConfigDict(saved)


def resolve_config(workdir: str | None, cfg: ml_collections.ConfigDict | None):
  """The config of a command: --config if given, else the workdir's saved one."""
  if cfg is not None:
    return cfg
  if workdir:
    return load_config(workdir)
  raise UserError('pass --config=configs/X.py (or --workdir of a run that has a config.json)')


# Fields a run may change between invocations on the same workdir (what to log, how far to
# train, how to search); every other field defines the run and must stay the same.
RUN_FREE_FIELDS = ('search', 'proxy', 'mesh', 'distributed', 'data.cache_dir',
                   'data.eval_batches', 'train.steps', 'train.log_every', 'train.eval_every',
                   'train.eval_archs', 'train.checkpoint_every', 'train.keep_checkpoints')
# Fields the supernet's arrays (and its seeded initialisation) depend on: a command that reads a
# workdir's supernet with another config must agree on these.
SUPERNET_FIELDS = ('seed', 'model', 'space')
# How the supernet runs, not what it holds or computes (the same arrays, the same function): any
# command may change them on a workdir, e.g. to try `model.skip_width_blocks` after a profile.
EXECUTION_FIELDS = ('model.attention', 'model.remat', 'model.skip_width_blocks')


def _flat(tree, prefix: str = '') -> dict[str, object]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def _as_json(cfg) -> dict:
  """A config as config.json holds it (tuples as lists), so a loaded one compares equal."""
  if isinstance(cfg, ml_collections.ConfigDict):
    return json.loads(cfg.to_json_best_effort())
  return json.loads(json.dumps(cfg, default=str))


def config_diff(old, new, *, only: tuple[str, ...] | None = None,
                ignore: tuple[str, ...] = ()) -> list[str]:
  """'field: old -> new' for every dotted field that differs (within `only`, outside `ignore`)."""
  a, b = _flat(_as_json(old)), _flat(_as_json(new))
  under = lambda key, names: any(key == n or key.startswith(n + '.') for n in names)
  # A field only one side has is left out: a config.json written before the field existed.
  keys = sorted(k for k in set(a) & set(b) if a[k] != b[k])
  keys = [k for k in keys if (only is None or under(k, only)) and not under(k, ignore)]
  return [f'{k}: {json.dumps(a[k])} -> {json.dumps(b[k])}' for k in keys]


def check_same_run(workdir: str | Path, cfg: ml_collections.ConfigDict, *,
                   continuing: bool) -> bool:
  """Compares `cfg` with W/config.json before anything in W is touched.

  `continuing`: the command adds to W's run (train, run), so every field but RUN_FREE_FIELDS
  must agree; otherwise (evaluate, export, search, proxy) only the SUPERNET_FIELDS must; the
  EXECUTION_FIELDS never need to. Raises UserError naming the fields that differ. Returns
  whether W has a config.json.
  """
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    return False
  saved = load_config(workdir)
  if continuing:
    diff = config_diff(saved, cfg, ignore=RUN_FREE_FIELDS + EXECUTION_FIELDS)
  else:
    diff = config_diff(saved, cfg, only=SUPERNET_FIELDS, ignore=EXECUTION_FIELDS)
  if diff:
    more = f' (and {len(diff) - 3} more)' if len(diff) > 3 else ''
    raise UserError(f'--workdir {workdir} holds a run of another config ({"; ".join(diff[:3])}'
                    f'{more}); use a new --workdir, or leave out --config to use {path}')
  return True


def check_exists(workdir: str | Path | None) -> None:
  """A --workdir that a reading command (evaluate, export, search of a trained run) is given must
  exist: a typo would otherwise silently read the untrained initialisation."""
  if workdir and not Path(workdir).is_dir():
    raise UserError(f'--workdir {workdir} does not exist; check the path (leave out --workdir to '
                    'use the config\'s seeded initialisation)')


@contextlib.contextmanager
def cleanup_on_failure(workdir: str | Path) -> Iterator[None]:
  """Removes what a failing command created in `workdir` while W holds no checkpoint (of training
  or of a search): a run that fails before it has saved anything leaves no workdir holding only
  config.json and TensorBoard files behind. Whatever was in W before is kept, and so is all of W
  once it holds checkpoints moved aside as unreadable (W/checkpoints_unreadable: the run found
  them there, and its error says where they went)."""
  workdir = Path(workdir)
  existed = workdir.is_dir()
  before = set(workdir.iterdir()) if existed else set()
  try:
    yield
  except BaseException:
    ckpt = workdir / 'checkpoints'
    saved = ((ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()))
             or (workdir / 'search' / 'state.npz').is_file()
             or (workdir / checkpoints.UNREADABLE_DIRNAME).is_dir())
    if not saved:
      atomic.remove_added(workdir, existed, before)
    raise


def check_seq_len(model_cfg, seq_len: int | None) -> None:
  """The data's rows must fit the model: learned positions have model.max_len rows (longer
  sequences index past the table), and rotary models are built and tested up to max_len."""
  max_len = int(model_cfg.max_len)
  if seq_len is not None and int(seq_len) > max_len:
    raise UserError(f'data.seq_len={seq_len} exceeds model.max_len={max_len}, the longest '
                    f'sequence the model is built for ({model_cfg.positions} positions); lower '
                    'data.seq_len or raise model.max_len')


def build_space(cfg: ml_collections.ConfigDict, workdir: str | Path | None = None) -> Space:
  """The config's space; with ELM's dynamic modules on, allocated at their extent and limited to
  the final space of `workdir`'s history (elastic_jax/space_history.py)."""
  model = model_config(cfg.model)
  space = space_config(space_history.space_section(cfg, workdir))
  space = with_scone_choices(space, scone_config(cfg.get('scone')))
  check_compatible(model, space)
  seq_len = cfg.get('data', {}).get('seq_len', None)
  check_seq_len(model, seq_len)
  return Space(model, space, seq_len=seq_len)


def init_supernet(cfg: ml_collections.ConfigDict, space: Space | None = None) -> Model:
  """The supernet at the config's seeded initialisation."""
  space = space or build_space(cfg)
  return Model(space.model, space.cfg.supernet_dims(), rngs=nnx.Rngs(int(cfg.get('seed', 0))),
               scone=scone_config(cfg.get('scone')))


def load_supernet(cfg: ml_collections.ConfigDict, workdir: str | None,
                  space: Space | None = None) -> tuple[Model, int | None]:
  """The latest trained supernet in `workdir` if there is one, else the seeded initialisation.

  Returns the model and the training step it comes from (None for the initialisation).
  """
  space = space or build_space(cfg, workdir)
  model, step = None, None
  if workdir:
    check_exists(workdir)
    from elastic_jax import checkpoints  # noqa: PLC0415  (Orbax loads only when needed)
    if checkpoints.has_checkpoints(workdir):
      # Restored into a shapes-only supernet: drawing the initialisation only to overwrite it
      # compiles a random draw per parameter shape (1-4 s of every command that loads W).
      with abstract_params():
        model = init_supernet(cfg, space)
      step = checkpoints.restore_params_if_any(Path(workdir), model)
  if step is None:
    model = init_supernet(cfg, space)
  init_from = cfg.get('train', {}).get('init_from', '')
  if step is None and init_from:  # e.g. an imported pre-trained model, not yet fine-tuned
    apply_init_from(init_from, model, space)
  return model, step


def apply_init_from(path: str, model: Model, space: Space) -> str:
  """Writes the weights `train.init_from` names into the supernet (in place); returns what they
  were. `path`: an exported dense model (placed at its source arch), a workdir with checkpoints
  (its latest supernet), or `hf:DIR`, a Hugging Face checkpoint (placed as the sub-network of its
  own sizes, which must be in the space)."""
  from elastic_jax import arch as arch_lib
  from elastic_jax import export as export_lib
  if path.startswith('hf:'):
    from elastic_jax.hf import convert
    from elastic_jax.hf.space import original_arch
    imported = convert.load_dense(path[3:])
    numerics = dict(dtype='float32', param_dtype='float32', init_std=0.0)  # not the function
    if dataclasses.replace(imported.model.cfg, **numerics) != dataclasses.replace(space.model,
                                                                                   **numerics):
      raise UserError(f'config field train.init_from={path!r}: the checkpoint\'s model family '
                      f'{imported.model.cfg} differs from the config\'s model section '
                      f'{space.model}; import it with `elastic-jax import-hf` instead')
    arch = arch_lib.from_json(original_arch(imported.shape, space.num_layers), space.cfg)
    export_lib.import_dense(model, space.cfg, arch, imported.model)
    return f'Hugging Face checkpoint {path[3:]}'
  from elastic_jax import checkpoints  # noqa: PLC0415
  p = Path(path)
  # A workdir has a config.json too: its checkpoints are checked first (as for a teacher).
  if (p / export_lib.CONFIG_FILE).is_file() and not checkpoints.has_checkpoints(p):
    from elastic_jax.hf.importer import load_fix  # noqa: PLC0415  (an import's W/pretrained)
    dense, saved = export_lib.load(p, fix=load_fix(p))
    source = saved.get('source_arch')
    if source is None:
      raise UserError(f'{p} records no source_arch; it cannot be placed into this supernet')
    export_lib.import_dense(model, space.cfg, arch_lib.from_json(source, space.cfg), dense)
    return f'exported model {p}'
  try:
    step = checkpoints.restore_params_if_any(p, model)
  except checkpoints.CheckpointMismatch as e:
    raise UserError(f'config field train.init_from={path!r}: its checkpoints do not fit the '
                    f'model of this config (step {e.step}: {e.detail}); point it at a run of the '
                    'same model and space') from None
  except checkpoints.UnreadableLatest as e:
    raise UserError(f'config field train.init_from={path!r}: {e}') from None
  if step is not None:
    return f'workdir {p}'
  raise UserError(f'config field train.init_from={path!r}: neither an exported model, a '
                  'workdir with checkpoints nor hf:DIR (a Hugging Face checkpoint)')


FORMATS = ('native', 'hf')


def save_export(model: Model, out: str | Path, data_cfg, *, arch=None,
                extra: Mapping | None = None, fmt: str = 'native', hf_base: Mapping | None = None,
                overwrite: bool = False, scone_table=None) -> dict:
  """Saves a run's exported model with the tokenizer of `data_cfg`, as `fmt`: 'native'
  (elastic_jax.export's format) or 'hf' (a directory `transformers` loads; `hf_base`: the
  imported original's config.json); `scone_table`: a SCONE sub-network's own table
  (`scone.job.export_table`), written into the export (native only). Returns what was
  written."""
  from elastic_jax import arch as arch_lib  # noqa: PLC0415
  from elastic_jax import data  # noqa: PLC0415
  from elastic_jax import export as export_lib  # noqa: PLC0415
  if fmt not in FORMATS:
    raise UserError(f'--format={fmt!r} is invalid; choose one of {list(FORMATS)}')
  if fmt == 'hf' and scone_table is not None:
    raise UserError('a SCONE sub-network exports with its f-gram table, which a Hugging Face '
                    'directory cannot hold: use --format=native')
  with tempfile.TemporaryDirectory() as tmp:
    files = {'tokenizer.json': data.load_tokenizer(data_cfg).save(Path(tmp) / 'tokenizer.json')}
    source = Path(str(data_cfg.get('tokenizer', '')))
    source_dir = source if source.is_dir() else source.parent
    if fmt == 'hf' and (source_dir / 'tokenizer.json').is_file():
      # A pre-trained model's own tokenizer files (roles, chat template), not our copy.
      from elastic_jax.hf import checkpoint  # noqa: PLC0415
      files = checkpoint.tokenizer_files(source_dir)
    if fmt == 'hf':
      from elastic_jax.hf import convert  # noqa: PLC0415
      extra = dict(extra or {})
      if arch is not None:
        extra['source_arch'] = arch_lib.to_json(arch)
      report = convert.save_dense(model, out, base=hf_base, files=files, extra=extra,
                                  overwrite=overwrite)
      return {'out': str(out), 'format': 'hf', 'params': report['params_real'],
              'params_stored': report['params_stored'], 'hf_model_type': report['model_type'],
              'note': report['note']}
    write_more, result = None, {}
    if scone_table is not None:
      from elastic_jax.scone import table as table_lib  # noqa: PLC0415
      scone = {'table': table_lib.EXPORT_DIR, 'fgrams': len(scone_table.fgrams),
               'max_n': scone_table.fgrams.max_n, 'table_mb': scone_table.nbytes / 1e6}
      extra, result = {**(extra or {}), 'scone': scone}, {'scone': scone}
      write_more = lambda tmp: table_lib.save_for_export(tmp, scone_table, model)
    export_lib.save(model, out, arch=arch, extra=extra, files=files, overwrite=overwrite,
                    write_more=write_more)
    return {'out': str(out), 'format': 'native', 'params': export_lib.param_count(model),
            **result}
