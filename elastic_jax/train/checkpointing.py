"""Orbax checkpoints of supernet training: params, optimizer state, step, RNG, data iterator.

Saved every N steps asynchronously (Orbax writes to a temporary name and renames when complete, so
a checkpoint is either whole or absent), keeping the last K. Restore takes the latest checkpoint,
and falls back to the one before it, with a warning, when the latest cannot be read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from elastic_jax.errors import UserError

ITEMS = ('params', 'extra_params', 'opt_state', 'meta')
DIRNAME = 'checkpoints'


def _manager(directory: Path, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(directory.absolute(), options=options, item_names=ITEMS)


class Checkpoints:
  def __init__(self, workdir: Path, keep: int = 3):
    self.directory = Path(workdir) / DIRNAME
    self.manager = _manager(self.directory, keep)

  def save(self, step: int, params, opt_state, rng, meta: dict) -> None:
    """`params` = {'model': supernet params, 'proj': ...}; the supernet's are an item of their
    own, so `restore_params_if_any` can read them without knowing the rest."""
    extra = {'rng': rng, **{k: v for k, v in params.items() if k != 'model'}}
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params['model']),
        extra_params=ocp.args.StandardSave(extra),
        opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta)))

  def restore_latest(self, abstract_params, abstract_opt_state, abstract_rng):
    """(params, opt_state, rng, meta) of the newest readable checkpoint, or None."""
    extra = {'rng': abstract_rng, **{k: v for k, v in abstract_params.items() if k != 'model'}}
    restored = _restore_latest(self.manager, abstract_params['model'], abstract_opt_state, extra)
    if restored is None:
      return None
    from flax import nnx
    model, opt_state, meta, extra = restored
    rng = extra.pop('rng')
    return nnx.State({'model': model, **extra}), opt_state, rng, meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _restore_latest(manager, abstract_params, abstract_opt_state=None, abstract_extra=None):
  steps = sorted(manager.all_steps(), reverse=True)
  errors = []
  for step in steps:
    items = {'params': ocp.args.StandardRestore(abstract_params), 'meta': ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
      items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
      items['extra_params'] = ocp.args.StandardRestore(abstract_extra)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001  (any unreadable checkpoint: fall back to an older one)
      logging.warning('checkpoint at step %d in %s is unreadable (%s); trying the previous one',
                      step, manager.directory, str(e).splitlines()[0][:200])
      errors.append((step, e))
      continue
    return (restored['params'], restored.get('opt_state'), restored['meta'],
            restored.get('extra_params'))
  if errors:
    raise UserError(f'no readable checkpoint in {manager.directory} (tried steps '
                    f'{[s for s, _ in errors]}); delete the directory to train from scratch')
  return None


def restore_params_if_any(workdir: Path, model) -> int | None:
  """Loads the latest trained params of `workdir` into `model`; returns the step, or None."""
  from flax import nnx

  directory = Path(workdir) / DIRNAME
  if not directory.is_dir():
    return None
  manager = _manager(directory, async_save=False)
  try:
    abstract = jax.eval_shape(lambda: nnx.state(model, nnx.Param))
    restored = _restore_latest(manager, abstract)
  finally:
    manager.close()
  if restored is None:
    return None
  params, _, meta, _ = restored
  nnx.update(model, params)
  return int(meta['step'])
