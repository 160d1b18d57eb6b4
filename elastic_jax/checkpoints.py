"""The one reader and writer of supernet checkpoints (W/checkpoints), for train, workdir and search.

A checkpoint holds params, optimizer state, step, RNG and the data iterator's position. Saved every
N steps asynchronously (Orbax writes to a temporary name and renames when complete, so a checkpoint
is either whole or absent), keeping the last K; a save Orbax refuses or fails is an error, never
silence. The training run's restore takes the latest checkpoint, and when it cannot be read moves it
aside (to W/checkpoints_unreadable/, kept for inspection) with a warning and falls back to the one
before it, whose later steps it then trains again. A reader that does not train (search, export,
evaluate, `train.init_from`, a teacher) never uses older weights in place of the latest: an
unreadable latest checkpoint is one error naming it, the newest step that does read, and the two
ways on (move the unreadable one aside to use that step, or let `train` retrain it). A checkpoint
whose saved arrays (per their metadata, read before any array is) have other shapes than the
config's model, or are other arrays, is not unreadable: the config changed, and that is one error
(`CheckpointMismatch`) that leaves every checkpoint in place. Arrays are restored onto the
shardings the caller gives, so a checkpoint written on one mesh or process count reads on any
other.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from elastic_jax.errors import UserError

ITEMS = ('params', 'extra_params', 'opt_state', 'meta')
DIRNAME = 'checkpoints'
UNREADABLE_DIRNAME = 'checkpoints_unreadable'


class CheckpointError(UserError):
  """A checkpoint could not be written."""


class CheckpointMismatch(UserError):
  """Checkpoints whose saved arrays do not fit the model the config builds (another shape, or
  another set of arrays): the config is not the one that wrote them. `detail` names the first
  difference."""

  def __init__(self, directory: Path, step: int, detail: str):
    self.directory, self.step, self.detail = Path(directory), step, detail
    super().__init__(
        f'the checkpoints in {directory} do not fit the model of the config (step {step}: '
        f'{detail}); the config has changed since they were written: restore the config that '
        'wrote them, or use a new --workdir for this config (the checkpoints are left as they '
        'are)')


class UnreadableLatest(UserError):
  """A reader that does not train found the newest checkpoint(s) unreadable and an older one
  readable: one error naming them and the ways on, instead of the older weights in their place."""

  def __init__(self, directory: Path, errors: list[tuple[int, str]], readable: int):
    steps = [s for s, _ in errors]
    newest, workdir = steps[0], Path(directory).parent
    which = (f'the latest checkpoint in {directory} (step {newest}) is unreadable'
             if len(steps) == 1 else
             f"the {len(steps)} latest checkpoints in {directory} (steps "
             f"{', '.join(map(str, steps))}) are unreadable")
    why = '; '.join(f'step {s}: {e}' for s, e in errors)
    aside = workdir / UNREADABLE_DIRNAME
    moves = ' and '.join(f'{directory / str(s)}' for s in steps)
    super().__init__(
        f'{which} ({why}); step {readable} reads. To use step {readable}, move {moves} out '
        f'of {directory} (e.g. into {aside}); to train steps {readable + 1}-{newest} again, run '
        f'`elastic-jax train --workdir={workdir}`, which moves unreadable checkpoints aside '
        'itself')


def has_checkpoints(workdir: str | Path) -> bool:
  """Whether `workdir` holds a checkpoint directory with anything in it."""
  directory = Path(workdir) / DIRNAME
  return directory.is_dir() and any(directory.iterdir())


def describe(error: BaseException) -> str:
  """An exception in words for a one-line message: its type and first line, at most 240 chars
  (a longer one ends in '...', so a cut path reads as cut), without TensorStore's `See full
  TensorStore details: <bound method ...>` tail (a repr, not a reason)."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  first = re.sub(r'\.?\s*See full TensorStore details:.*', '', lines[0]) if lines else ''
  text = f'{type(error).__name__}: {first}' if first else type(error).__name__
  return text if len(text) <= 240 else text[:237] + '...'


def _manager(directory: Path, keep: int = 3, async_save: bool = True,
             this_process_only: bool = False) -> ocp.CheckpointManager:
  """All processes take part in each save and restore (each writes / reads its own shards)
  unless `this_process_only`: a reader of host-local arrays that the other processes do not join
  (an init_from / teacher / search supernet read on one host)."""
  extra = {}
  if this_process_only and jax.process_count() > 1:
    me = jax.process_index()
    extra['multiprocessing_options'] = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f'process{me}')
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=not this_process_only, **extra)
  return ocp.CheckpointManager(directory.absolute(), options=options, item_names=ITEMS)


def abstract_of(tree):
  """ShapeDtypeStructs with the shardings of `tree`'s arrays: a restore target that puts every
  array where the live one is (any mesh, any process count). A leaf with no sharding (a
  shapes-only parameter) goes to this process's first device, as an eager array would."""
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=x.sharding or local), tree)


class Checkpoints:
  """The training state's checkpoints in W/checkpoints. In a multi-process run every process
  calls `save` and `restore_latest` with its part of the global arrays; the workdir must be a
  filesystem all hosts share."""

  def __init__(self, workdir: Path, keep: int = 3):
    self.directory = Path(workdir) / DIRNAME
    self.unreadable = Path(workdir) / UNREADABLE_DIRNAME
    self.manager = _manager(self.directory, keep)

  def save(self, step: int, state, meta: dict) -> None:
    """`state`: a TrainState (params = {'model': supernet params, 'proj': ...}); the supernet's
    params are an item of their own, so `restore_params_if_any` can read them alone.

    Raises CheckpointError when Orbax refuses the save (it skips a step not newer than its latest
    one, silently) or when this or the previous, asynchronous, save failed."""
    extra = {'rng': state.rng, **{k: v for k, v in state.params.items() if k != 'model'}}
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params['model']),
          extra_params=ocp.args.StandardSave(extra),
          opt_state=ocp.args.StandardSave(state.opt_state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # noqa: BLE001  (Orbax raises many types; name the step and the cause)
      raise CheckpointError(f'saving the checkpoint of step {step} in {self.directory} failed '
                            f'({describe(e)}); check the disk space and permissions there') from e
    if not saved:
      latest = self.manager.latest_step()
      raise CheckpointError(f'Orbax refused to save the checkpoint of step {step}: '
                            f'{self.directory} holds step {latest} already; move '
                            f'{self.directory / str(latest)} away or train in a new workdir')

  def restore_latest(self, abstract_state):
    """(state, meta) of the newest readable checkpoint, or None. `abstract_state`: the TrainState
    as ShapeDtypeStructs carrying shardings (`StepSetup.abstract_state`)."""
    from flax import nnx
    params = abstract_state.params
    extra = {'rng': abstract_state.rng, **{k: v for k, v in params.items() if k != 'model'}}
    restored = _restore_latest(self.manager, params['model'], abstract_state.opt_state, extra,
                               move_unreadable_to=self.unreadable)
    if restored is None:
      return None
    model, opt_state, meta, extra = restored
    rng = extra.pop('rng')
    state = abstract_state.replace(step=_replicated_step(meta['step'], abstract_state.step),
                                   params=nnx.State({'model': model, **extra}),
                                   opt_state=opt_state, rng=rng)
    return state, meta

  def wait(self) -> None:
    """Blocks until the asynchronous save in flight is on disk; CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f'writing a checkpoint in {self.directory} failed ({describe(e)}); '
                            'check the disk space and permissions there') from e

  def close(self) -> None:
    self.manager.close()


def _replicated_step(step: int, abstract):
  """The step counter as a global array with `abstract`'s sharding."""
  import numpy as np
  value = np.asarray(step, abstract.dtype)
  return jax.make_array_from_callback((), abstract.sharding, lambda _: value)


def _restore_latest(manager, abstract_params, abstract_opt_state=None, abstract_extra=None,
                    move_unreadable_to: Path | None = None):
  """(params, opt_state, meta, extra) of the newest readable checkpoint, or None if there is none.

  `move_unreadable_to`: move each unreadable checkpoint there and fall back to the one before (the
  training run's restore, which will save those steps again; Orbax would refuse a step it still
  lists). Without it (a reader that does not train), unreadable newer checkpoints are an error
  (`UnreadableLatest`) once an older one is found to read: the weights the caller asked for, the
  latest, are not there, and older ones are not used in their place."""
  steps = sorted(manager.all_steps(), reverse=True)
  errors = []
  targets = {'params': abstract_params}
  if abstract_opt_state is not None:
    targets.update(extra_params=abstract_extra, opt_state=abstract_opt_state)
  for step in steps:
    # Saved for another model (per its metadata; no array is read): the config changed, not the
    # checkpoint. An error that leaves every checkpoint where it is (no fallback: the older ones
    # fit no better). Checked before Orbax starts reading, which would fail part-way and leave
    # its array reads abandoned (a "coroutine never awaited" warning after the error).
    mismatch = _shape_mismatch(Path(manager.directory) / str(step), targets)
    if mismatch is not None:
      raise CheckpointMismatch(Path(manager.directory), step, mismatch)
    items = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
    items['meta'] = ocp.args.JsonRestore()
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
      meta = restored['meta']
      if not isinstance(meta, dict) or meta.get('step') != step or type(meta['step']) is not int:
        raise ValueError(f'its meta item does not hold step {step} ({str(meta)[:80]})')
    except Exception as e:  # noqa: BLE001  (any unreadable checkpoint: fall back to an older one)
      where = ''
      if move_unreadable_to is not None:
        where = f'; moved to {_move_aside(manager, step, move_unreadable_to)}'
      if step != steps[-1] and move_unreadable_to is not None:  # the last one's: the error below
        logging.warning('checkpoint at step %d in %s is unreadable (%s)%s; trying the previous '
                        'one', step, manager.directory, describe(e), where)
      errors.append((step, describe(e)))
      continue
    if errors and move_unreadable_to is None:
      raise UnreadableLatest(Path(manager.directory), errors, step)
    return (restored['params'], restored.get('opt_state'), restored['meta'],
            restored.get('extra_params'))
  if errors:
    tried = '; '.join(f'step {s}: {why}' for s, why in errors)
    moved = (f' (moved to {move_unreadable_to}; run again to train from scratch)'
             if move_unreadable_to is not None else
             '; restore the workdir from a copy, or run `elastic-jax train` on it, which moves '
             'unreadable checkpoints aside and trains from scratch')
    raise UserError(f'no readable checkpoint in {manager.directory} ({tried}){moved}')
  return None


# What each item's arrays are, in messages.
_ITEM_WORDS = {'params': 'parameter', 'extra_params': 'training array',
               'opt_state': 'optimizer state array'}


def _key_name(key) -> str:
  """A pytree path entry as a name: dict key, attribute or index ('layers', 'value', '0')."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict[str, tuple | None]:
  """{'embed/tokens': shape} for every array of `tree` (ShapeDtypeStructs, or Orbax's saved
  array metadata); an nnx Variable's trailing 'value' is left out of the name."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [_key_name(k) for k in path]
    if len(names) > 1 and names[-1] == 'value':
      names.pop()
    shape = getattr(leaf, 'shape', None)
    out['/'.join(names)] = None if shape is None else tuple(int(n) for n in shape)
  return out


def _saved_shapes(item_dir: Path) -> dict[str, tuple | None] | None:
  """The shapes of the arrays saved in a checkpoint item, from its metadata (no array is read);
  None when the metadata cannot be read (a damaged checkpoint)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return _shapes(handler.metadata(item_dir))
  except Exception:  # noqa: BLE001  (missing, truncated or garbled metadata: unreadable)
    return None
  finally:
    handler.close()


def _shape_mismatch(step_dir: Path, targets: dict) -> str | None:
  """How the arrays saved in checkpoint `step_dir` differ from the restore's `targets` (item ->
  ShapeDtypeStructs), per their saved metadata: the first difference in words, with how many
  more there are; None when they fit, or when the metadata of an item cannot be read (then the
  checkpoint is damaged, not of another model)."""
  for item, target in targets.items():
    saved = _saved_shapes(step_dir / item)
    if saved is None:
      return None
    want, word = _shapes(target), _ITEM_WORDS.get(item, f'{item} array')
    diffs = [f'{word} {k} is saved with shape {saved[k]} but the config builds {want[k]}'
             for k in want if k in saved and None not in (saved[k], want[k])
             and saved[k] != want[k]]
    diffs += [f'the config builds {word} {k} {want[k]}, which the checkpoint does not hold'
              for k in want if k not in saved]
    diffs += [f'{word} {k} {saved[k]} is saved but the config builds no such array'
              for k in saved if k not in want]
    if diffs:
      more = f', and {len(diffs) - 1} more arrays differ' if len(diffs) > 1 else ''
      return diffs[0] + more
  return None


def _move_aside(manager, step: int, target_dir: Path) -> Path:
  """Renames checkpoint `step` to target_dir/<step>[.n] (process 0; the others wait), and makes
  the manager forget it."""
  _sync(f'elastic_jax_move_aside_{step}_start')  # every process names the same target
  source = Path(manager.directory) / str(step)
  target = target_dir / str(step)
  n = 0
  while target.exists():
    n += 1
    target = target_dir / f'{step}.{n}'
  if jax.process_index() == 0 and source.exists():
    target_dir.mkdir(parents=True, exist_ok=True)
    source.rename(target)
  _sync(f'elastic_jax_move_aside_{step}_done')
  manager.reload()
  return target


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def restore_params_if_any(workdir: Path, model) -> int | None:
  """Loads the latest trained params of `workdir` into `model` (host-local arrays, e.g. from
  `init_supernet`, or shapes only, restored to this process's first device), whatever mesh and
  process count wrote them; returns the step, or None.
  An unreadable latest checkpoint is an error (`UnreadableLatest`), not a fallback: see above.

  Reads on this process alone: in a multi-process run the others need not call it."""
  from flax import nnx

  directory = Path(workdir) / DIRNAME
  if not directory.is_dir():
    return None
  manager = _manager(directory, async_save=False, this_process_only=True)
  try:
    restored = _restore_latest(manager, abstract_of(nnx.state(model, nnx.Param)))
  finally:
    manager.close()
  if restored is None:
    return None
  params, _, meta, _ = restored
  nnx.update(model, params)
  return int(meta['step'])
