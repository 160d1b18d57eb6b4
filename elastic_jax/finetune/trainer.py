"""Fine-tuning an exported model on one task (GLUE, or SQuAD extractive QA), and the glue-small
suite. What is task-specific (head, data, loss, dev metrics) lives in the task's job
(`glue_job.GlueJob`, `squad_job.SquadJob`); this module is the loop around it.

Workdir layout:
  finetune.json        what is being fine-tuned (model, task, settings); a rerun must match it
  checkpoints/latest   params, optimizer state and progress after the last finished epoch (Orbax)
  checkpoints/best     params of the epoch with the best dev score
  results.json         dev metrics of every epoch and the best one

A killed run resumes from `latest`: the data order of an epoch is a function of (seed, epoch), so
the resumed run computes what the uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from elastic_jax import atomic
from elastic_jax import export as export_lib
from elastic_jax.data.builders import glue_tsv
from elastic_jax.data.glue_tasks import TASKS, get_task
from elastic_jax.data.tokenizer import tokenizer_from_file
from elastic_jax.errors import UserError
from elastic_jax.finetune import inputs, probe, squad_data
from elastic_jax.finetune.classifier import SEQUENCE_KEYS
from elastic_jax.finetune.glue_job import GlueJob
from elastic_jax.finetune.squad_job import SquadJob

SUITES = {'glue-small': ('cola', 'sst2', 'mrpc', 'rte', 'stsb', 'wnli')}
MANIFEST = 'finetune.json'
RESULTS = 'results.json'


def default_config() -> ml_collections.ConfigDict:
  """The `finetune` section; defaults follow W-PCA's GLUE fine-tuning (batch 32; 10 epochs, CoLA
  50; prediction-layer distillation with weight 1 when a teacher is given)."""
  c = ml_collections.ConfigDict()
  c.glue_dir = ''  # GLUE directory of TSV files (CoLA/, SST-2/, ...), or 'tfds' (online)
  c.cache_dir = ''  # built datasets ('' = the data cache default)
  c.seq_len = 128
  c.batch_size = 32
  c.epochs = 10
  c.epochs_cola = 50  # W-PCA fine-tunes CoLA longer
  c.learning_rate = 5e-5
  c.warmup_fraction = 0.1  # linear warmup over this share of the steps, then linear decay to 0
  c.weight_decay = 0.01
  c.eval_batch_size = 64
  # Each batch is cut to its longest row rounded up to this multiple (at most seq_len), so short
  # sentences do not pay for seq_len (GLUE's CoLA and SST-2 average 12-25 tokens); one compile
  # per length bucket. Evaluation sorts the rows by length first. 0: every batch is seq_len long.
  c.pad_to_multiple = 32
  c.max_train_examples = 0  # > 0: only the first N training examples (quick runs)
  c.max_dev_examples = 0
  c.seed = 0
  # SQuAD (--task squad / squad_v2), the standard recipe's settings (seq_len 384 there):
  c.squad_dir = ''  # directory of train-v1.1.json / dev-v1.1.json (-v2.0), or 'tfds' (online)
  c.doc_stride = 128  # tokens between the starts of a long context's windows
  c.max_query_len = 64  # questions are cut to this many tokens
  c.n_best = 20  # start / end candidates per window when reading the answer
  c.max_answer_len = 30  # tokens
  c.null_threshold = 0.0  # v2.0: answer '' when no-answer beats the best span by more than this
  c.teacher = ''  # a finetune workdir of the same task: distil its best checkpoint's predictions
  c.distill_weight = 1.0  # weight of the soft cross-entropy (MSE for regression) to the teacher
  c.hard_weight = 0.0  # weight of the label loss when distilling (1 without a teacher)
  c.temperature = 1.0  # distillation temperature
  # GLUE heads: how the model's last hidden states become one vector per example: 'auto' (BERT's
  # pooler where the model has one, else the [CLS] state for encoders, the last real token's for
  # decoders), 'pooler', 'cls', 'last', or 'mean' (over the real tokens: what sentence-transformers
  # checkpoints such as all-MiniLM-L6-v2 were trained with). Only 'auto' / 'pooler' classifiers
  # export to transformers' BertForSequenceClassification.
  c.pooling = 'auto'
  # GLUE sentence pairs: 'cross' (one sequence A [SEP] B, every layer attending across the pair:
  # BERT's recipe) or 'siamese' (each sentence encoded alone and pooled to u, v; the head reads
  # (u, v, |u - v|) for classes, cos(u, v) for STS-B's score: how sentence-transformers models,
  # all-MiniLM-L6-v2 among them, are trained and used, so their similarity training carries over).
  # Single-sentence tasks read one sequence either way. Siamese heads have no transformers form.
  c.pair_encoding = 'cross'
  # LP-FT (finetune/probe.py): before the first epoch the GLUE head is fitted on the frozen
  # backbone's pooled features of the training split (the run's own loss, L-BFGS, an L2 penalty
  # on the kernel of the features divided by their common scale), so fine-tuning starts from a
  # fitted head, not a random one. Several penalties: the one of least held-out loss in
  # `probe_folds`-fold cross-validation on the training split; one, e.g. (0.01,): that one.
  c.linear_probe = True
  c.probe_l2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
  c.probe_folds = 5
  return c


# finetune fields that must be numbers in a range: (lowest, above it, lowest allowed itself).
_RANGES = {
    'seq_len': (4, math.inf, True), 'batch_size': (1, math.inf, True),
    'eval_batch_size': (1, math.inf, True), 'epochs': (1, math.inf, True),
    'epochs_cola': (1, math.inf, True), 'learning_rate': (0.0, math.inf, True),
    'warmup_fraction': (0.0, 1.0, True), 'weight_decay': (0.0, math.inf, True),
    'pad_to_multiple': (0, math.inf, True), 'max_train_examples': (0, math.inf, True),
    'max_dev_examples': (0, math.inf, True), 'doc_stride': (1, math.inf, True),
    'max_query_len': (1, math.inf, True), 'n_best': (1, math.inf, True),
    'max_answer_len': (1, math.inf, True), 'distill_weight': (0.0, math.inf, True),
    'hard_weight': (0.0, math.inf, True), 'temperature': (0.0, math.inf, False),
}
_INTEGERS = ('seq_len', 'batch_size', 'eval_batch_size', 'epochs', 'epochs_cola',
             'pad_to_multiple', 'max_train_examples', 'max_dev_examples', 'doc_stride',
             'max_query_len', 'n_best', 'max_answer_len')


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """UserError naming the first `finetune` field outside its range, before anything is read or
  written (a zero batch or epoch count, a negative learning rate, a warmup share of 1 or more
  failed deep inside the run, or ran)."""
  for name, (low, high, closed) in _RANGES.items():
    value = cfg.get(name)
    number = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
    if not (number and (name not in _INTEGERS or float(value).is_integer())
            and (value >= low if closed else value > low) and value < high):
      bound = (f'>= {low}' if closed else f'> {low}') + (f' and < {high}' if high < math.inf
                                                         else '')
      kind = 'a whole number' if name in _INTEGERS else 'a number'
      raise UserError(f'finetune.{name}={value!r} must be {kind} {bound}')


def job_for(task_name: str) -> GlueJob | SquadJob:
  """The job of `task_name`: a GLUE task, or 'squad' / 'squad_v2'."""
  if task_name in squad_data.VERSIONS:
    return SquadJob(task_name)
  if task_name.lower().removeprefix('glue/').replace('-', '').replace('_', '') not in TASKS:
    raise UserError(f'unknown task {task_name!r}; use a GLUE task ({", ".join(TASKS)}) or '
                    f'{" / ".join(squad_data.VERSIONS)}')
  return GlueJob(get_task(task_name))


def _load_model_and_tokenizer(model_dir: str | Path):
  model, tokenizer_path = export_lib.load_any(model_dir)
  if tokenizer_path is None:
    raise UserError(f'--model {model_dir} has no tokenizer.json; fine-tuning needs the model\'s '
                    'tokenizer beside it (`elastic-jax export` writes one)')
  return model, tokenizer_from_file(tokenizer_path)


def _with_defaults(config: dict) -> dict:
  """A saved run's config with every field added since it was made at its default (as JSON
  holds it: tuples as lists)."""
  return json.loads(json.dumps({**default_config().to_dict(), **config}))


def _head(model_dir, job, seed: int, pooling: str = 'auto', pair_encoding: str = 'cross'):
  model, tokenizer = _load_model_and_tokenizer(model_dir)
  return job.head(model, seed, pooling, pair_encoding), tokenizer


def _lengths(split: dict) -> np.ndarray:
  """Each row's real tokens (of its longer sentence for siamese pairs [N, 2, T])."""
  real = split['segment_ids'] > 0
  return real.sum(axis=-1).reshape(len(real), -1).max(axis=1)


def _batches(split: dict, order: np.ndarray, size: int, keys: tuple[str, ...],
             pad_to_multiple: int = 0):
  """Fixed-size batches of `keys` in `order`, the last one padded with weight-0 rows. With
  `pad_to_multiple` > 0 the per-token arrays are cut to the batch's longest row rounded up to that
  multiple (padding positions only: `segment_ids` is 0 there, and every model reads it as the
  attention mask, so the real rows' outputs do not change)."""
  full = split['segment_ids'].shape[-1]
  for start in range(0, len(order), size):
    idx = order[start:start + size]
    real = len(idx)
    idx = np.concatenate([idx, np.zeros(size - real, idx.dtype)])
    batch = {k: split[k][idx] for k in keys}
    if pad_to_multiple > 0:
      longest = int(_lengths(batch)[:real].max())
      length = min(full, -(-max(longest, 1) // pad_to_multiple) * pad_to_multiple)
      batch.update({k: batch[k][..., :length] for k in SEQUENCE_KEYS})
    batch['weight'] = (np.arange(size) < real).astype(np.float32)
    yield batch


def outputs(graphdef, params, arrays: dict, batch_size: int, pad_to_multiple: int = 0,
            method: str = '__call__') -> np.ndarray:
  """The head's outputs (or another `method` of the head model: 'pooled' for its features) for
  every row of `arrays` (model inputs [N, T]). With `pad_to_multiple` the rows are run shortest
  first in batches cut to their length (`_batches`); the outputs must then be per row ([N, ...]
  without a time axis), returned in the rows' own order."""
  forward = _forward_fn(graphdef, method)
  order = np.arange(len(arrays['tokens']))
  if pad_to_multiple > 0:
    order = np.argsort(_lengths(arrays), kind='stable')
  out = []
  for batch in _batches(arrays, order, batch_size, SEQUENCE_KEYS, pad_to_multiple):
    logits = np.asarray(forward(params, {k: batch[k] for k in SEQUENCE_KEYS}))
    out.append(logits[:int(batch['weight'].sum())])
  result = np.concatenate(out)
  unsorted = np.empty_like(result)
  unsorted[order] = result
  return unsorted


_FORWARDS: dict = {}


def _forward_fn(graphdef, method: str = '__call__'):
  key = (graphdef, method)
  if key not in _FORWARDS:
    _FORWARDS[key] = jax.jit(lambda p, b: getattr(nnx.merge(graphdef, p), method)(b))
  return _FORWARDS[key]


def _linear_probe(graphdef, params, train: dict, job: GlueJob, cfg, teacher, log: Callable):
  """`params` with the head fitted on the frozen backbone's pooled features of `train`
  (`finetune.linear_probe`; probe.py)."""
  start = time.perf_counter()
  run = functools.partial(outputs, batch_size=cfg.eval_batch_size,
                          pad_to_multiple=cfg.pad_to_multiple)
  features = run(graphdef, params, train, method='pooled')
  teacher_out = None if teacher is None else run(teacher[0], teacher[1], train)
  clf = nnx.merge(graphdef, params)
  kernel, bias, penalty = probe.fit_head(
      features, train['label'], teacher_out, clf.kernel.shape[1],
      lambda out, batch, t: job.loss(out, batch, t, cfg), tuple(cfg.probe_l2),
      int(cfg.probe_folds))
  clf.kernel[...] = jnp.asarray(kernel, clf.kernel.dtype)
  clf.bias[...] = jnp.asarray(bias, clf.bias.dtype)
  log(f'{job.name}: head fitted on frozen features (linear probe, L2 {penalty:g}) in '
      f'{time.perf_counter() - start:.1f} s')
  return nnx.split(clf, nnx.Param)[1]


def _manager(directory: Path, items: tuple[str, ...]) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory.absolute(), options=options, item_names=items)


def _restore(manager: ocp.CheckpointManager, abstract: dict):
  step = manager.latest_step()
  args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
  args['meta'] = ocp.args.JsonRestore()
  return manager.restore(step, args=ocp.args.Composite(**args))


def load_best(workdir: str | Path):
  """(model with its head, job, best dev metrics) of a finished or running fine-tuning workdir;
  `job.task` is the GlueTask of a GLUE run."""
  workdir = Path(workdir)
  path = workdir / MANIFEST
  if not path.is_file():
    raise UserError(f'{workdir} is not a fine-tuning workdir ({MANIFEST} is missing)')
  manifest = json.loads(path.read_text())
  job = job_for(manifest['task'])
  config = _with_defaults(manifest['config'])
  clf, _ = _head(manifest['model'], job, config['seed'], config['pooling'],
                 config['pair_encoding'])
  best = workdir / 'checkpoints' / 'best'
  if not best.is_dir():
    raise UserError(f'{workdir} has no best checkpoint yet; fine-tune at least one epoch')
  graphdef, params = nnx.split(clf, nnx.Param)
  restored = _restore(_manager(best, ('params', 'meta')), {'params': params})
  return nnx.merge(graphdef, restored['params']), job, restored['meta']


def finetune(model_dir: str | Path, task_name: str, workdir: str | Path,
             cfg: ml_collections.ConfigDict | None = None, *, log: Callable = print,
             on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
  """Fine-tunes `model_dir` on `task_name` (a GLUE task, 'squad' or 'squad_v2') in `workdir`
  (resuming it); returns the results."""
  cfg = cfg or default_config()
  check_config(cfg)
  job = job_for(task_name)
  workdir = Path(workdir)
  # As JSON reads it back (tuples become lists), so a rerun's comparison is like with like.
  manifest = json.loads(json.dumps({'model': str(Path(model_dir).resolve()), 'task': job.name,
                                    'config': cfg.to_dict()}))
  if (workdir / MANIFEST).is_file():
    previous = json.loads((workdir / MANIFEST).read_text())
    previous['config'] = _with_defaults(previous.get('config', {}))
    if previous != manifest:
      raise UserError(f'{workdir} holds a fine-tuning run of other settings ({MANIFEST}); use '
                      'a new --workdir or the same model, task and config')
  clf, tokenizer = _head(model_dir, job, cfg.seed, cfg.pooling, cfg.pair_encoding)
  kind = clf.backbone.cfg.kind
  inputs.check_tokenizer(tokenizer, kind, clf.backbone.cfg.vocab_size)
  seq_len = min(int(cfg.seq_len), clf.backbone.cfg.max_len)
  start = time.perf_counter()
  train, dev = job.load(cfg, tokenizer, kind, seq_len)
  n_train = job.size(train)
  log(f'{job.name}: {n_train} train rows encoded, dev read in '
      f'{time.perf_counter() - start:.1f} s')

  teacher = None
  if cfg.teacher:
    teacher_clf, teacher_job, _ = load_best(cfg.teacher)
    if teacher_job.name != job.name:
      raise UserError(f'finetune.teacher {cfg.teacher} was fine-tuned on {teacher_job.name}, '
                      f'not {job.name}')
    if getattr(teacher_clf, 'siamese', False) != getattr(clf, 'siamese', False):
      raise UserError(f'finetune.teacher {cfg.teacher} reads {job.name} pairs '
                      f'{"siamese" if teacher_clf.siamese else "cross"}-encoded, this run '
                      f'{"siamese" if clf.siamese else "cross"}: the teacher must read the '
                      'examples as the student does (set finetune.pair_encoding alike)')
    teacher = nnx.split(teacher_clf, nnx.Param)

  epochs = job.epochs(cfg)
  steps_per_epoch = math.ceil(n_train / cfg.batch_size)
  total = epochs * steps_per_epoch
  warmup = int(cfg.warmup_fraction * total)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
       optax.linear_schedule(cfg.learning_rate, 0.0, max(total - warmup, 1))], [warmup])
  tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  graphdef, params = nnx.split(clf, nnx.Param)
  opt_state = tx.init(params)

  def train_step(params, opt_state, batch, teacher_params):
    teacher_BL = None
    if teacher is not None:
      teacher_BL = jax.lax.stop_gradient(nnx.merge(teacher[0], teacher_params)(batch))

    def loss_fn(p):
      return job.loss(nnx.merge(graphdef, p)(batch), batch, teacher_BL, cfg)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step_fn = jax.jit(train_step, donate_argnums=(0, 1))
  teacher_params = teacher[1] if teacher is not None else None

  latest = _manager(workdir / 'checkpoints' / 'latest', ('params', 'opt_state', 'meta'))
  best = _manager(workdir / 'checkpoints' / 'best', ('params', 'meta'))
  progress = {'epoch': -1, 'best_score': -math.inf, 'best_epoch': -1, 'history': []}
  if latest.latest_step() is not None:
    restored = _restore(latest, {'params': params, 'opt_state': opt_state})
    params, opt_state, progress = restored['params'], restored['opt_state'], restored['meta']
    log(f'resuming after epoch {progress["epoch"] + 1} of {epochs}')
  else:
    if cfg.linear_probe and isinstance(job, GlueJob):
      params = _linear_probe(graphdef, params, train, job, cfg, teacher, log)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(workdir / MANIFEST, json.dumps(manifest, indent=2) + '\n')

  for epoch in range(progress['epoch'] + 1, epochs):
    order = np.random.default_rng((cfg.seed, epoch)).permutation(n_train)
    t0, losses = time.perf_counter(), []
    for batch in _batches(train, order, cfg.batch_size, (*SEQUENCE_KEYS, *job.label_keys),
                          cfg.pad_to_multiple):
      batch = {k: jnp.asarray(v) for k, v in batch.items()}
      params, opt_state, loss = step_fn(params, opt_state, batch, teacher_params)
      losses.append(loss)
    train_loss = float(np.mean(jax.device_get(losses)))
    if not math.isfinite(train_loss):
      raise UserError(f'{job.name} epoch {epoch + 1}: the training loss is {train_loss}; lower '
                      'finetune.learning_rate')
    dev_metrics = job.evaluate(
        functools.partial(outputs, graphdef, params, batch_size=cfg.eval_batch_size,
                          pad_to_multiple=0 if job.per_token else cfg.pad_to_multiple), dev, cfg)
    record = {'epoch': epoch + 1, 'train_loss': train_loss, 'seconds':
              round(time.perf_counter() - t0, 2), **{k: round(v, 6) for k, v in
                                                     dev_metrics.items()}}
    progress['history'].append(record)
    log(json.dumps(record))
    if dev_metrics['score'] > progress['best_score']:
      progress.update(best_score=dev_metrics['score'], best_epoch=epoch + 1)
      best.save(epoch, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               meta=ocp.args.JsonSave(record)))
    progress['epoch'] = epoch
    latest.save(epoch, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               opt_state=ocp.args.StandardSave(opt_state),
                                               meta=ocp.args.JsonSave(progress)))
    best.wait_until_finished()
    latest.wait_until_finished()
    if on_epoch_end is not None:
      on_epoch_end(epoch, record)

  best_record = next(r for r in progress['history'] if r['epoch'] == progress['best_epoch'])
  metric = job.task.metric if isinstance(job, GlueJob) else 'f1'
  result = {'task': job.name, 'model': manifest['model'], 'metric': metric,
            'best': best_record, 'history': progress['history']}
  atomic.write_text(workdir / RESULTS, json.dumps(result, indent=2) + '\n')
  return result


def run_suite(model_dir: str | Path, suite: str, workdir: str | Path,
              cfg: ml_collections.ConfigDict | None = None, *, log: Callable = print) -> dict:
  """Fine-tunes every task of `suite` in workdir/<task>; writes workdir/<suite>.json and .md."""
  if suite not in SUITES:
    raise UserError(f'unknown --suite {suite!r}; use one of {", ".join(SUITES)}')
  glue = (cfg or default_config()).glue_dir
  if glue and glue != 'tfds':  # every task's files before the first is fine-tuned
    glue_tsv.check_tasks(glue, [get_task(name) for name in SUITES[suite]], 'finetune.glue_dir')
  workdir = Path(workdir)
  scores = {}
  for name in SUITES[suite]:
    result = finetune(model_dir, name, workdir / name, cfg, log=log)
    scores[name] = {k: v for k, v in result['best'].items()
                    if k not in ('epoch', 'train_loss', 'seconds')}
  scores['avg'] = float(np.mean([s['score'] for s in scores.values()]))
  rows = [f'| {name} | {", ".join(f"{k} {100 * v:.1f}" for k, v in s.items() if k != "score")} '
          f'| {100 * s["score"]:.1f} |' for name, s in scores.items() if name != 'avg']
  md = '\n'.join([f'# {suite}: {model_dir}', '', '| task | dev metrics | score |', '|---|---|---|',
                  *rows, f'| avg | | {100 * scores["avg"]:.1f} |', ''])
  atomic.write_text(workdir / f'{suite}.json', json.dumps(scores, indent=2) + '\n')
  atomic.write_text(workdir / f'{suite}.md', md)
  return scores
