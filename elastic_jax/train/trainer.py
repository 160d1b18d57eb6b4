"""The supernet training job: `elastic-jax train --config C --workdir W`.

Order of construction (sharding-first, as on a pod): abstract shapes -> shardings -> `jax.jit(init,
out_shardings=...)`; the step is `jax.jit(step, in_shardings, out_shardings, donate_argnums)`.
Resume order: the workdir's own latest checkpoint -> `train.init_from` -> the seeded init.
The host dispatches step N+1 before it reads step N's metrics, so the device never waits on logging.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import checkpoints as checkpoints_lib
from elastic_jax import data, distributed, evaluation, parallel
from elastic_jax import export as export_lib
from elastic_jax.errors import UserError
from elastic_jax.scone import job as scone_job
from elastic_jax.scone.config import scone_config
from elastic_jax.train import config as train_config
from elastic_jax.train import curves, distill
from elastic_jax.train.dynamic import config as dynamic_config
from elastic_jax.train.dynamic.controller import Controller
from elastic_jax.train.logger import MetricLogger
from elastic_jax.train.sampling import Sampler, teacher_is_first
from elastic_jax.train.step import (
    DistillSpec,
    TrainState,
    abstract_state,
    make_optimizer,
    make_train_step,
)
from elastic_jax.train.step import state_shardings as state_shardings_of
from elastic_jax.workdir import (
  apply_init_from,
  build_space,
  check_same_run,
  cleanup_on_failure,
  init_supernet,
  load_config,
  load_supernet,
  save_config,
)


class TrainingDiverged(UserError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def _named_archs(names, space) -> tuple[list[str], list]:
  labels, archs = [], []
  for name in names:
    if name == 'largest':
      archs.append(space.largest())
    elif name == 'smallest':
      archs.append(space.smallest())
    else:
      archs.append(arch_lib.load(name, space.cfg))
    labels.append(Path(name).stem if name not in ('largest', 'smallest') else name)
  return labels, archs


def load_teacher(path: str, cfg, *, abstract: bool = False):
  """An external dense teacher: an exported model dir, or a run's workdir (its trained supernet's
  largest sub-network, exported; read with the run's own config and space, which may differ from
  `cfg`'s; `cfg` stands in for a workdir without a config.json). `abstract`: its parameters as
  shapes only, no weights read (`elastic-jax compile`)."""
  p = Path(path)
  if checkpoints_lib.has_checkpoints(p):  # a workdir has a config.json too: checked first
    t_cfg = load_config(p) if (p / export_lib.CONFIG_FILE).is_file() else cfg
    space = build_space(t_cfg, p)
    if abstract:
      return export_lib.abstract_export(space.model, space.cfg, space.largest())
    supernet, step = load_supernet(t_cfg, str(p), space)
    if step is None:
      raise UserError(f'teacher workdir {p} has no readable checkpoint; train it first')
    return export_lib.export(supernet, space.cfg, space.largest())
  if (p / export_lib.CONFIG_FILE).is_file():
    from elastic_jax.hf.importer import load_fix  # noqa: PLC0415  (compress's W/pretrained)
    return (export_lib.load_abstract if abstract else export_lib.load)(p, fix=load_fix(p))[0]
  raise UserError(f'config field train.distill.teacher={path!r}: no exported model '
                  f'({export_lib.CONFIG_FILE}) or checkpoints found there; export a model with '
                  '`elastic-jax export` or train a teacher first')


def _distill_spec(cfg, space, teacher) -> tuple[DistillSpec, dict]:
  d = cfg.train.distill
  weights = {k: float(d[k]) for k in ('ce', 'logits_kl', 'hidden_mse', 'attn_kl',
                                       'block_preserving')}
  num_layers = space.num_layers
  if teacher is None:
    t_layers = num_layers
    largest = space.largest()
    teacher_heads = tuple(int(h) for h in largest.heads)
    t_width = {'hidden': space.cfg.supernet_dims().hidden}
  else:
    t_layers = len(teacher.dims.layers)
    teacher_heads = tuple(l.heads for l in teacher.dims.layers)
    t_width = {'hidden': teacher.dims.hidden}
    if not t_layers and any(weights[k] for k in distill.FEATURE_LOSSES):
      raise UserError('the external teacher has no layers to distil features from')
  layer_map = distill.resolve_layer_map(list(d.layer_map), num_layers, max(t_layers, 1))
  dims = space.cfg.supernet_dims()
  s_block_width = max(dims.hidden, dims.layers[0].inner)
  if teacher is None:
    t_block_width = s_block_width
  else:
    t_block_width = max([teacher.dims.hidden] + [l.inner for l in teacher.dims.layers])
  features = {}
  if weights['hidden_mse']:
    features['hidden'] = (num_layers, dims.hidden, t_width['hidden'])
  if weights['block_preserving']:
    features['embed'] = (1, dims.hidden, t_width['hidden'])
    features['attn_out'] = (num_layers, s_block_width, t_block_width)
    features['ffn_out'] = (num_layers, s_block_width, t_block_width)
  for field in ('start_step', 'ramp_steps'):
    if not (isinstance(d[field], int) and d[field] >= 0):
      raise UserError(f'config field train.distill.{field}={d[field]!r} must be an integer >= 0')
  in_place = teacher is None and teacher_is_first(cfg.train.sampling)
  if in_place and weights['block_preserving']:
    logging.warning(
        'train.distill.block_preserving=%g with the in-place teacher: in bench/bench_elm.py it '
        'held every sub-network at the unigram loss (the students share the teacher\'s '
        'weights); set train.distill.teacher to a trained model for it',
        weights['block_preserving'])
  spec = DistillSpec(weights=weights, temperature=float(d.temperature), in_place=in_place,
                     layer_map=layer_map, teacher_heads=teacher_heads,
                     start_step=d.start_step, ramp_steps=d.ramp_steps)
  return spec, features


def _external_teacher_fn(teacher_graphdef, gather=None):
  """The external teacher's forward in the step; `gather`: applied to its parameters first, as
  to the students' (`parallel.gather_fn`): left to choose, XLA kept the FSDP-split teacher split
  and computed its forward for the whole batch on every device."""
  from elastic_jax.train.step import teacher_targets

  def run(params, inputs, capture):
    params = params if gather is None else gather(params)
    # Stop-gradient parameters: the projection the students' KL calls later carries none either.
    model = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(params))
    x, feats = model.pre_logits(inputs, None, capture)
    return teacher_targets(x, feats, model.project)
  return run


@dataclasses.dataclass
class StepSetup:
  """The training step of a config on a mesh and how its state lies there: what `train` runs and
  what `elastic-jax compile` (elastic_jax/aot.py) compiles for a TPU slice."""

  space: object
  mesh: jax.sharding.Mesh
  sampler: Sampler
  strategy: str
  graphdef: object  # the supernet's
  proj_graphdef: object  # the distillation projections'
  init_params: object  # () -> {'model', 'proj'} params at the seeded initialisation (jit it)
  tx: optax.GradientTransformation
  schedule: object
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  teacher_shardings: object  # of an external teacher's params, else None
  step: object  # jit(step)(state, batch, teacher_params[, allowed]) -> (state, metrics), donated
  sharding_report: dict
  dynamic: bool = False  # the step takes the sampler's `Allowed` (train.dynamic)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the training state (no arrays)."""
    return abstract_state(jax.eval_shape(self.init_params), self.tx, self.state_shardings)


def build_step(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, teacher=None, *,
               grad_accum: int | None = None, unroll_inner: bool = False) -> StepSetup:
  """The jitted training step of `cfg` over `mesh` (sharding-first, nothing allocated).

  `teacher`: an external dense teacher model (train.distill.teacher), else None. `grad_accum`
  overrides train.grad_accum (aot's FLOP analysis compiles one micro-batch); `unroll_inner`
  traces the loops over the K - 1 sub-networks and train.logits_chunk's chunks unrolled (aot's
  FLOP-counting twin; `train.step.make_loss_fn`).
  """
  tcfg = cfg.train
  grad_accum = int(tcfg.grad_accum if grad_accum is None else grad_accum)
  space = build_space(cfg)
  fixed = arch_lib.load(tcfg.arch, space.cfg) if tcfg.arch else None
  strategy = 'fixed' if fixed is not None else tcfg.sampling
  anchor_file = tcfg.get('anchor_archs', '')
  anchors = (arch_lib.load_all(anchor_file, space.cfg)
             if strategy == 'anchored' and anchor_file else None)
  sampler = Sampler(space, strategy, tcfg.num_random, tcfg.ramp_steps, fixed, anchors)

  abstract = nnx.eval_shape(lambda: init_supernet(cfg, space))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  model_shardings = parallel.param_shardings(abstract_params, mesh)
  sharding_report = parallel.check_sufficiently_sharded(abstract_params, model_shardings, mesh)
  spec, proj_features = _distill_spec(cfg, space, teacher)
  proj_graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: distill.Projections(proj_features, rngs=nnx.Rngs(0))), nnx.Param)

  def init_params():
    params = nnx.state(init_supernet(cfg, space), nnx.Param)
    proj = nnx.state(distill.Projections(proj_features, rngs=nnx.Rngs(0)), nnx.Param)
    return nnx.State({'model': params, 'proj': proj})

  replicated = parallel.replicated(mesh)
  abstract_all = jax.eval_shape(init_params)
  shardings = nnx.State({'model': model_shardings,
                         'proj': jax.tree.map(lambda _: replicated, abstract_all['proj'],
                                              is_leaf=lambda x: isinstance(x, nnx.Variable))})
  tx, schedule = make_optimizer(tcfg)
  state_shardings = state_shardings_of(tx, abstract_all, shardings, mesh)

  external = teacher_shardings = None
  if teacher is not None:
    t_graphdef, t_params = nnx.split(teacher, nnx.Param)
    teacher_shardings = parallel.param_shardings(t_params, mesh)
    external = _external_teacher_fn(t_graphdef, parallel.gather_fn(cfg, mesh))
  dynamic = Controller.wanted(cfg)
  step_fn = make_train_step(graphdef, proj_graphdef, sampler, tx, spec, grad_accum, external,
                            micro_sharding=parallel.microbatch_sharding(mesh),
                            logits_chunk=int(tcfg.get('logits_chunk', 0)),
                            unroll_subnets=bool(tcfg.get('unroll_subnets', True)),
                            unroll_inner=unroll_inner,
                            gather=parallel.gather_fn(cfg, mesh),
                            slices=dense_slices(cfg, sampler, dynamic))
  batch_sharding = parallel.batch_sharding(mesh)
  in_shardings = (state_shardings, batch_sharding, teacher_shardings) + (
      (replicated,) if dynamic else ())
  step = jax.jit(parallel.on_mesh(step_fn, mesh), in_shardings=in_shardings,
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
  return StepSetup(space, mesh, sampler, strategy, graphdef, proj_graphdef, init_params, tx,
                   schedule, state_shardings, batch_sharding, teacher_shardings, step,
                   sharding_report, dynamic)


# The training steps `train` built last, by what they were built from. Calling `train` again in
# the same process with the same config (a notebook cell re-run after an interruption, a resume)
# reuses the traced step and its compiled executable instead of tracing it again and reading it
# back from the compilation cache (~10 s + ~7 s for the tiny quickstart model on a 2-core CPU).
_STEPS: collections.OrderedDict = collections.OrderedDict()
_STEPS_KEPT = 2


def _step_key(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """What `build_step(cfg, mesh)` is built from: the whole config and the contents of the
  architecture files it reads; None (build anew) for a config JSON cannot hold."""
  try:
    text = cfg.to_json(sort_keys=True)
  except (TypeError, ValueError):
    return None
  files = tuple(Path(f).read_bytes() if f and Path(f).is_file() else f
                for f in (cfg.train.arch, cfg.train.get('anchor_archs', '')))
  return text, files, mesh


def shared_step(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> StepSetup:
  """`build_step(cfg, mesh)` (no external teacher), reused while the config, its architecture
  files and the mesh are the same. `clear_shared_steps()` forgets them (what a test that patches
  the step's code between calls needs)."""
  key = _step_key(cfg, mesh)
  if key is None:
    return build_step(cfg, mesh)
  if key not in _STEPS:
    _STEPS[key] = build_step(cfg, mesh)
    while len(_STEPS) > _STEPS_KEPT:
      _STEPS.popitem(last=False)
  _STEPS.move_to_end(key)
  return _STEPS[key]


def clear_shared_steps() -> None:
  _STEPS.clear()


def dense_slices(cfg: ml_collections.ConfigDict, sampler: Sampler, dynamic: bool) -> tuple:
  """The dense models the step runs for its static archs (`train.step.make_loss_fn`'s `slices`):
  with train.dense_static_archs, a space that stays the same and no SCONE; else ()."""
  if (not cfg.train.get('dense_static_archs', True) or dynamic
      or scone_config(cfg.get('scone')) is not None):
    return ()
  return tuple(export_lib.slicer(sampler.space.cfg, a) for a in sampler.static_archs())


def check_batch(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """The global batch splits over the mesh's batch axes and into train.grad_accum micro-batches."""
  parallel.check_batch(cfg.data.batch_size, mesh)
  if cfg.data.batch_size % cfg.train.grad_accum:
    raise UserError(f'config data.batch_size={cfg.data.batch_size} is not divisible by '
                    f'train.grad_accum={cfg.train.grad_accum}')


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True) -> dict:
  """Trains the supernet of `cfg` in `workdir`; returns the final metrics.

  Multi-process (see elastic_jax/distributed.py): every process calls this with the same config
  and workdir; each reads its own data shards, the step runs over all processes' devices, each
  writes its shards of the checkpoints, and only process 0 writes config.json and metrics.
  """
  workdir = Path(workdir)
  tcfg = cfg.train
  train_config.check(tcfg)  # before anything is created
  dynamic_config.check(cfg)
  scone_config(cfg.get('scone'))  # likewise: a bad scone field fails here
  data.check_lm_task(cfg.data)
  space = build_space(cfg)
  mesh = parallel.make_mesh(cfg.get('mesh', {}))
  check_batch(cfg, mesh)
  tokenizer = data.load_tokenizer(cfg.data)
  data.check_vocab(tokenizer, cfg.model.vocab_size, task=cfg.data.task)
  # A workdir of another run keeps its config.json (its checkpoints' only description): refused
  # here, before it is rewritten, for library callers as for the CLI.
  check_same_run(workdir, cfg, continuing=True)
  is_main = jax.process_index() == 0
  with cleanup_on_failure(workdir) if is_main else contextlib.nullcontext():
    if is_main:
      save_config(workdir, cfg)
    return _train(cfg, workdir, space, mesh, is_main, progress)


def _initial_state(cfg, space, setup: StepSetup) -> tuple[TrainState, str]:
  """The state at step 0 and where its weights come from: the seeded initialisation, created
  sharded, or `train.init_from`'s weights, read on every host (the projections seeded); the
  optimizer's state initialised for them."""
  shardings, replicated = setup.state_shardings, parallel.replicated(setup.mesh)
  params = jax.jit(setup.init_params, out_shardings=shardings.params)()
  source = 'seeded initialisation'
  if cfg.train.init_from:
    model = init_supernet(cfg, space)
    source = apply_init_from(cfg.train.init_from, model, space)
    params = nnx.State({'model': distributed.put_global(nnx.state(model, nnx.Param),
                                                        shardings.params['model']),
                        'proj': params['proj']})
  opt_state = jax.jit(setup.tx.init, out_shardings=shardings.opt_state)(params)
  step0, rng = jax.jit(lambda: (jnp.int32(0), jax.random.key_data(jax.random.key(int(cfg.seed)))),
                       out_shardings=(replicated, replicated))()
  return TrainState(step=step0, params=params, opt_state=opt_state, rng=rng), source


def _train(cfg, workdir: Path, space, mesh, is_main: bool, progress: bool) -> dict:
  tcfg = cfg.train

  teacher = load_teacher(tcfg.distill.teacher, cfg) if tcfg.distill.teacher else None
  setup = build_step(cfg, mesh, teacher) if teacher is not None else shared_step(cfg, mesh)
  sampler, replicated = setup.sampler, parallel.replicated(mesh)
  learning_rate = jax.jit(setup.schedule)  # one program, not one per primitive at each log

  # The latest checkpoint, restored into the state's shapes; else the seeded initialisation,
  # created sharded, or another run's weights, read on every host.
  checkpoints = checkpoints_lib.Checkpoints(workdir, tcfg.keep_checkpoints)
  restored = checkpoints.restore_latest(setup.abstract_state())
  if restored is not None:
    state, meta = restored
    source = f"the checkpoint at step {meta['step']}"
  else:
    state, source = _initial_state(cfg, space, setup)

  shard_index, shard_count = distributed.process_batch_shard(setup.batch_sharding,
                                                             cfg.data.batch_size)
  scfg = scone_config(cfg.get('scone'))
  fgrams = transform = None
  if scfg is not None:  # SCONE: the run's f-grams, looked up in every batch on the host
    fgrams = scone_job.run_fgrams(scfg, cfg.data, workdir, write=is_main,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
    transform = scone_job.batch_transform(fgrams)
  iterator = data.train_iterator(cfg.data, process_index=shard_index, process_count=shard_count,
                                 transform=transform)
  if restored is not None:
    iterator.set_state(data.process_state(restored[1]['data_state'], shard_index, shard_count))

  teacher_params = None
  if teacher is not None:
    teacher_params = distributed.put_global(nnx.state(teacher, nnx.Param),
                                            setup.teacher_shardings)
  train_step = setup.step
  dynamic = allowed = None
  if setup.dynamic:  # ELM's dynamic modules: the space's limits, resumed with the checkpoint
    dynamic = Controller(cfg, workdir, space, setup, is_main=is_main)
    dynamic.start(None if restored is None else int(restored[1]['step']))
    allowed = dynamic.allowed()

  if setup.strategy == 'fixed':  # the one architecture trained is the one to report
    labels, eval_archs = ['arch'], [sampler.fixed]
  else:
    labels, eval_archs = _named_archs(list(tcfg.eval_archs), space)

  def eval_set():
    # The evaluation set is the same on every process: each puts its devices' part. In a
    # changing space 'largest' and 'smallest' are the current ones.
    archs = list(eval_archs)
    if allowed is not None:
      current = {'largest': allowed.largest, 'smallest': allowed.smallest}
      archs = [current.get(label, a) for label, a in zip(labels, archs)]
    return distributed.put_global(arch_lib.stack(archs), replicated)

  eval_stacked = eval_set()
  eval_data = distributed.put_global(
      evaluation.stack_batches(data.eval_batches(cfg.data, transform)),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES)))

  def run_eval(state):
    sums = evaluation._sums_population(setup.graphdef, state.params['model'], eval_stacked,
                                       eval_data, len(labels), mesh=mesh)
    summary = evaluation._summarise(distributed.to_host(sums))
    out = {}
    for i, label in enumerate(labels):
      out[f'eval/{label}/loss'] = float(summary['loss'][i])
      out[f'eval/{label}/perplexity'] = float(summary['perplexity'][i])
      if cfg.model.kind == 'encoder':
        out[f'eval/{label}/accuracy'] = float(summary['accuracy'][i])
    return out

  start_step = int(state.step)
  if restored is not None and is_main:
    print(f'resuming from the checkpoint at step {start_step} in {checkpoints.directory}',
          file=sys.stderr, flush=True)
  logger = MetricLogger(workdir, enabled=is_main, total=tcfg.steps, start=start_step,
                        progress=progress)
  if setup.strategy == 'fixed':
    what = (f'one architecture ({tcfg.arch}, {int(space.cost(sampler.fixed)["params"]):,} '
            'parameters)')
  else:
    what = (f'{space.describe()["architectures"]:,} architectures, {sampler.k} per step '
            f'({setup.strategy})')
  logger.info(f'training from {source} to step {tcfg.steps}: {what}, mesh {dict(mesh.shape)} '
              f'over {jax.process_count()} process(es), '
              f'{setup.sharding_report["replicated_fraction"]:.0%} replicated')
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  pending = None  # (step, metrics) dispatched but not yet read
  last_eval = {}

  def meta_for(step):
    # The run's data position: every process's shards (a collective; Orbax writes it once).
    states = distributed.allgather_json(iterator.get_state())
    return {'step': step, 'data_state': data.merge_process_states(states)}

  def flush(pending):
    step, metrics, t_dispatch = pending
    host = jax.device_get(metrics)
    loss = float(host['loss'])
    if not bool(host['finite']):
      checkpoints.wait()
      raise TrainingDiverged(f'training diverged at step {step} (loss {loss}, gradient norm '
                             f'{float(host["grad_norm"])}); the last good checkpoint in '
                             f'{checkpoints.directory} is kept; lower train.learning_rate or '
                             'raise train.warmup_steps')
    if step % tcfg.log_every == 0 or step == tcfg.steps:
      # loss: the step's objective, the SUM over its K sub-networks of their losses (README,
      # "Training"); each sub-network's loss and cross-entropy are logged under its label.
      line = {'step': step, 'loss': loss, 'grad_norm': float(host['grad_norm']),
              'lr': float(learning_rate(step - 1))}
      ces = np.asarray(host['ce_per_arch'])
      for label, arch_loss, ce in zip(sampler.labels, np.asarray(host['loss_per_arch']), ces,
                                      strict=True):
        line[f'train/{label}/loss'] = float(arch_loss)
        line[f'train/{label}/ce'] = float(ce)
      # The bar: the first sub-network's own cross-entropy, and the loss the optimizer sees
      # (summed over the step's sub-networks, distillation terms included), named as such.
      shown = {f'{sampler.labels[0]} ce': float(ces[0])}
      if sampler.k > 1:
        shown[f'loss (sum of {sampler.k})'] = loss
      logger.log(step, line, tokens=tokens_per_step, show=shown, at=t_dispatch)

  try:
    t_start = time.perf_counter()
    host_step = start_step  # the device's step, known on the host without a sync
    while host_step < tcfg.steps:
      batch = distributed.global_batch(_model_batch(next(iterator)), setup.batch_sharding)
      state, metrics = train_step(state, batch, teacher_params,
                                  *(() if allowed is None else (allowed,)))
      host_step += 1
      step = host_step
      if pending is not None:
        flush(pending)
      pending = (step, metrics, time.perf_counter())
      if dynamic is not None:
        state, changed, dyn_log, messages = dynamic.after_step(step, state)
        if changed:
          allowed = dynamic.allowed()
          eval_stacked = eval_set()
        if dyn_log:
          flush(pending)
          pending = None
          logger.log(step, dyn_log)
        for message in messages:
          logger.info(message)
      if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.steps:
        flush(pending)
        pending = None
        last_eval = run_eval(state)
        logger.log(step, last_eval)
      if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
        if pending is not None:
          flush(pending)
        pending = None
        checkpoints.save(step, state, meta_for(step))
    if pending is not None:
      flush(pending)
    last_eval = run_eval(state)
    logger.log(int(state.step), last_eval)
    elapsed = time.perf_counter() - t_start
  finally:
    try:
      checkpoints.wait()  # CheckpointError if the last save failed
    finally:
      checkpoints.close()
      logger.close()
  if scfg is not None:  # every process joins the gather; the main one writes the table
    host_params = jax.tree.map(distributed.to_host, state.params['model'])
  if is_main:
    curves.plot_training(workdir)
    if scfg is not None:
      model = nnx.merge(setup.graphdef, host_params)
      table_dir = scone_job.write_table(model, fgrams, workdir, scfg)
      print(f'SCONE: embedding table of {len(fgrams):,} f-grams in {table_dir}', file=sys.stderr,
            flush=True)
  return {'step': int(state.step), 'seconds': elapsed, **last_eval}


def _model_batch(batch: dict) -> dict:
  keep = evaluation.MODEL_INPUTS + evaluation.LOSS_INPUTS
  return {k: np.asarray(v) for k, v in batch.items() if k in keep}
