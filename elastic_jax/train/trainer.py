"""The supernet training job: `elastic-jax train --config C --workdir W`.

Order of construction (sharding-first, as on a pod): abstract shapes -> shardings -> `jax.jit(init,
out_shardings=...)`; the step is `jax.jit(step, in_shardings, out_shardings, donate_argnums)`.
Resume order: the workdir's own latest checkpoint -> `train.init_from` -> the seeded init.
The host dispatches step N+1 before it reads step N's metrics, so the device never waits on logging.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import data, evaluation, parallel
from elastic_jax import export as export_lib
from elastic_jax.errors import UserError
from elastic_jax.train import distill
from elastic_jax.train.checkpointing import Checkpoints, restore_params_if_any
from elastic_jax.train.logger import MetricLogger
from elastic_jax.train.sampling import Sampler, teacher_is_first
from elastic_jax.train.step import DistillSpec, TrainState, make_optimizer, make_train_step
from elastic_jax.workdir import build_space, init_supernet, save_config


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


def _load_teacher(path: str, cfg, space):
  """An external dense teacher: an exported model dir, or a workdir's trained supernet (its
  largest sub-network, exported)."""
  p = Path(path)
  if (p / export_lib.CONFIG_FILE).is_file():
    return export_lib.load(p)[0]
  if (p / 'checkpoints').is_dir():
    teacher_cfg = cfg
    supernet = init_supernet(teacher_cfg, space)
    if restore_params_if_any(p, supernet) is None:
      raise UserError(f'teacher workdir {p} has no readable checkpoint; train it first')
    return export_lib.export(supernet, space.cfg, space.largest())
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
  spec = DistillSpec(weights=weights, temperature=float(d.temperature),
                     in_place=teacher is None and teacher_is_first(cfg.train.sampling),
                     layer_map=layer_map, teacher_heads=teacher_heads)
  return spec, features


def _external_teacher_fn(teacher_graphdef):
  from elastic_jax.train.step import teacher_outputs

  def run(params, inputs, capture):
    model = nnx.merge(teacher_graphdef, params)
    out = model(inputs, None, capture)
    logits, feats = out if capture else (out, {})
    return teacher_outputs(logits, feats)
  return run


def _init_from(path: str, model, cfg, space) -> str:
  p = Path(path)
  if (p / export_lib.CONFIG_FILE).is_file():
    dense, saved = export_lib.load(p)
    source = saved.get('source_arch')
    if source is None:
      raise UserError(f'{p} records no source_arch; it cannot be placed into this supernet')
    export_lib.import_dense(model, space.cfg, arch_lib.from_json(source, space.cfg), dense)
    return f'exported model {p}'
  if restore_params_if_any(p, model) is not None:
    return f'workdir {p}'
  raise UserError(f'config field train.init_from={path!r}: neither an exported model nor a '
                  'workdir with checkpoints')


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True) -> dict:
  """Trains the supernet of `cfg` in `workdir`; returns the final metrics."""
  workdir = Path(workdir)
  tcfg = cfg.train
  space = build_space(cfg)
  mesh = parallel.make_mesh(cfg.get('mesh', {}))
  parallel.check_batch(cfg.data.batch_size, mesh)
  if cfg.data.batch_size % tcfg.grad_accum:
    raise UserError(f'config data.batch_size={cfg.data.batch_size} is not divisible by '
                    f'train.grad_accum={tcfg.grad_accum}')
  tokenizer = data.load_tokenizer(cfg.data)
  data.check_vocab(tokenizer, cfg.model.vocab_size)
  is_main = jax.process_index() == 0
  if is_main:
    save_config(workdir, cfg)

  fixed = arch_lib.load(tcfg.arch, space.cfg) if tcfg.arch else None
  strategy = 'fixed' if fixed is not None else tcfg.sampling
  sampler = Sampler(space, strategy, tcfg.num_random, tcfg.ramp_steps, fixed)

  # Abstract model -> shardings -> sharded initialisation.
  abstract = nnx.eval_shape(lambda: init_supernet(cfg, space))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  model_shardings = parallel.param_shardings(abstract_params, mesh)
  sharding_report = parallel.check_sufficiently_sharded(abstract_params, model_shardings, mesh)

  teacher = _load_teacher(tcfg.distill.teacher, cfg, space) if tcfg.distill.teacher else None
  spec, proj_features = _distill_spec(cfg, space, teacher)
  proj = distill.Projections(proj_features, rngs=nnx.Rngs(0))
  proj_graphdef, proj_params = nnx.split(proj, nnx.Param)

  def init_params():
    params = nnx.state(init_supernet(cfg, space), nnx.Param)
    return nnx.State({'model': params, 'proj': proj_params})

  shardings = nnx.State({'model': model_shardings,
                         'proj': jax.tree.map(lambda _: parallel.replicated(mesh), proj_params)})
  tx, schedule = make_optimizer(tcfg)
  params = jax.jit(init_params, out_shardings=shardings)()
  model_for_init = nnx.merge(graphdef, params['model'])
  source = 'seeded initialisation'
  if tcfg.init_from:
    source = _init_from(tcfg.init_from, model_for_init, cfg, space)
    params = jax.device_put(nnx.State({'model': nnx.state(model_for_init, nnx.Param),
                                       'proj': params['proj']}), shardings)
  opt_state = jax.jit(tx.init)(params)
  rng = jax.random.key_data(jax.random.key(int(cfg.seed)))
  state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, rng=rng)

  iterator = data.train_iterator(cfg.data, process_index=jax.process_index(),
                                 process_count=jax.process_count())
  checkpoints = Checkpoints(workdir, tcfg.keep_checkpoints)
  restored = checkpoints.restore_latest(jax.eval_shape(lambda: state.params),
                                        jax.eval_shape(lambda: state.opt_state),
                                        jax.eval_shape(lambda: state.rng))
  if restored is not None:
    r_params, r_opt, r_rng, meta = restored
    opt_shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    state = TrainState(step=jnp.int32(meta['step']), params=jax.device_put(r_params, shardings),
                       opt_state=jax.device_put(r_opt, opt_shardings),
                       rng=jnp.asarray(r_rng, jnp.uint32))
    iterator.set_state(meta['data_state'])
    source = f"checkpoint at step {meta['step']}"

  teacher_params = None
  external = None
  if teacher is not None:
    t_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    teacher_params = jax.device_put(teacher_params, parallel.param_shardings(teacher_params, mesh))
    external = _external_teacher_fn(t_graphdef)
  step_fn = make_train_step(graphdef, proj_graphdef, sampler, tx, spec, tcfg.grad_accum, external)
  batch_sharding = parallel.batch_sharding(mesh)
  replicated = parallel.replicated(mesh)
  # Optimizer moments follow their parameters; scalars (step counts) are replicated on the mesh.
  on_mesh = lambda x: (x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding)
                       and x.sharding.mesh == mesh else replicated)
  state_shardings = TrainState(step=replicated, params=shardings,
                               opt_state=jax.tree.map(on_mesh, state.opt_state), rng=replicated)
  teacher_shardings = (None if teacher_params is None
                       else jax.tree.map(lambda x: x.sharding, teacher_params))
  state = jax.device_put(state, state_shardings)
  train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, teacher_shardings),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)

  labels, eval_archs = _named_archs(list(tcfg.eval_archs), space)
  eval_stacked = arch_lib.stack(eval_archs)
  eval_data = evaluation.stack_batches(data.eval_batches(cfg.data))

  def run_eval(state):
    sums = evaluation._sums_population(graphdef, state.params['model'], eval_stacked, eval_data,
                                       len(labels))
    summary = evaluation._summarise(np.asarray(sums))
    out = {}
    for i, label in enumerate(labels):
      out[f'eval/{label}/loss'] = float(summary['loss'][i])
      out[f'eval/{label}/perplexity'] = float(summary['perplexity'][i])
      if cfg.model.kind == 'encoder':
        out[f'eval/{label}/accuracy'] = float(summary['accuracy'][i])
    return out

  start_step = int(state.step)
  logger = MetricLogger(workdir, enabled=is_main, total=tcfg.steps, start=start_step,
                        progress=progress)
  logger.info(f'training from {source}: {space.describe()["architectures"]:,} architectures, '
              f'{sampler.k} per step ({strategy}), mesh {dict(mesh.shape)}, '
              f'{sharding_report["replicated_fraction"]:.0%} replicated')
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  pending = None  # (step, metrics) dispatched but not yet read
  last_eval = {}

  def meta_for(step):
    return {'step': step, 'data_state': iterator.get_state()}

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
      ces = np.asarray(host['ce_per_arch'])
      line = {'step': step, 'loss': loss, 'grad_norm': float(host['grad_norm']),
              'lr': float(schedule(step - 1)), 'ce_first': float(ces[0]),
              'ce_last': float(ces[-1]), 'ce_mean': float(ces.mean())}
      logger.log(step, line, tokens=tokens_per_step)

  try:
    t_start = time.perf_counter()
    host_step = start_step  # the device's step, known on the host without a sync
    while host_step < tcfg.steps:
      batch = jax.device_put(_model_batch(next(iterator)), batch_sharding)
      state, metrics = train_step(state, batch, teacher_params)
      host_step += 1
      step = host_step
      if pending is not None:
        flush(pending)
      pending = (step, metrics, time.perf_counter())
      if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.steps:
        flush(pending)
        pending = None
        last_eval = run_eval(state)
        logger.log(step, last_eval)
      if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
        if pending is not None:
          flush(pending)
        pending = None
        checkpoints.save(step, state.params, state.opt_state, state.rng, meta_for(step))
    if pending is not None:
      flush(pending)
    last_eval = run_eval(state)
    logger.log(int(state.step), last_eval)
    elapsed = time.perf_counter() - t_start
  finally:
    checkpoints.wait()
    checkpoints.close()
    logger.close()
  return {'step': int(state.step), 'seconds': elapsed, **last_eval}


def _model_batch(batch: dict) -> dict:
  keep = evaluation.MODEL_INPUTS + ('targets', 'weights')
  return {k: np.asarray(v) for k, v in batch.items() if k in keep}
