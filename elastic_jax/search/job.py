"""The search job: an experiment config and a trained supernet in, a Pareto front out.

  run_search(cfg, workdir) -> dict

writes W/search/:
  pareto.json     the final front (genome, arch, every objective and cost on the selection and
                  the held-out validation batches, measured latency of the exported dense
                  model), the baselines, the settings
  history.jsonl   one line per generation: evaluations, best value of each objective, hypervolume
  pareto.png      the front with random architectures and the smallest / largest archs
  summary.md      the same as a readable report
  state.npz       the search checkpoint (population, archive, generation, key, history)

Generations run inside one jitted `lax.scan` of `search.checkpoint_every` generations
(`driver.advance`; the last call masks the generations past the end with `lax.cond`, so it reuses
the same program): the fitness, a forward pass of the whole population through the supernet, is
traced and compiled once per run, however many generations and checkpoints. The supernet's state
and the validation batches are arguments of that jitted function, not constants. Generation g
uses the key `fold_in(key(seed), g)`, so a run resumed from its checkpoint continues exactly as an
uninterrupted run would have, and a finished run given more generations continues where it
stopped. Children that are the same network as an evaluated one are resampled (the archive), so
evaluations count distinct architectures.

The population forward runs on the config's `mesh`, with the trainer's shardings
(`search/placement.py`). In a multi-process run every process calls `run_search` with the same
config: all take part in every evaluation and hold the same search state; only process 0 writes
W/search/ (and measures latency).

This module only orchestrates: the settings are `search/config.py`, the compiled loop
`search/driver.py` (built on the mesh by `search/program.py`), the checkpoint
`search/checkpoint.py`, the front `search/pareto.py`, the files `search/report.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from elastic_jax import arch as arch_lib
from elastic_jax.errors import UserError
from elastic_jax.search import checkpoint, placement
from elastic_jax.search import genomes as genomes_lib
from elastic_jax.search import pareto as pareto_lib
from elastic_jax.search import program as search_program
from elastic_jax.search.budgets import Budgets
from elastic_jax.search.checkpoint import CHECKPOINT_FILE, fingerprint, results_digest
from elastic_jax.search.config import SearchConfig, resolve_strategy, search_config
from elastic_jax.search.fitness import Fitness
from elastic_jax.search.objectives import REPORT_METRICS, get_objective, training_free
from elastic_jax.search.program import make_searcher  # noqa: F401  (its former home)
from elastic_jax.search.proxy_objective import register_proxies

SEARCH_DIR = 'search'


def _log_stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def validation_batches(cfg, holdout: int, log=_log_stderr,
                       transform=None) -> tuple[list, list]:
  """(selection, held-out) validation batches: the `data.eval_batches` batches the search scores
  with, and the next `holdout` batches of the split (with data.eval_batches = 0, the whole
  split: its last `holdout` batches are held out), which only the final report reads.
  `transform`: applied to every batch (a SCONE run's f-gram lookup)."""
  from elastic_jax import data as data_lib  # noqa: PLC0415
  if holdout == 0:
    return data_lib.eval_batches(cfg.data, transform), []
  data_cfg = data_lib.DataConfig.from_config(cfg.data)
  n_select = data_cfg.eval_batches
  batches = data_lib.eval_batches(dataclasses.replace(
      data_cfg, eval_batches=n_select + holdout if n_select else 0), transform)
  n_select = n_select or max(1, len(batches) - holdout)
  selection, heldout = batches[:n_select], batches[n_select:]
  if not selection:
    raise UserError(
        f'the validation split gives no batch of {data_cfg.batch_size} rows '
        'to search with; lower data.batch_size or use a larger validation split')
  if len(heldout) < holdout:
    log(f'warning: the validation split has room for only {len(heldout)} of '
        f'search.holdout_batches={holdout} held-out batches after data.eval_batches='
        f'{data_cfg.eval_batches}' + ('' if heldout else '; the front is not re-scored'))
  return selection, heldout


def load_trained_supernet(cfg, workdir, space, allow_untrained: bool = False):
  """(model, step) of the latest trained supernet in W/checkpoints, or a UserError saying to
  train first (or the initialisation with step None when `allow_untrained`). A workdir whose
  `train.init_from` names pre-trained weights (an imported Hugging Face model) is searchable
  before any training: step None, the pre-trained weights."""
  from elastic_jax import checkpoints  # noqa: PLC0415
  from elastic_jax.workdir import load_supernet  # noqa: PLC0415

  ckpt = Path(workdir) / checkpoints.DIRNAME
  has_checkpoint = checkpoints.has_checkpoints(workdir)
  step = None
  model = None
  if has_checkpoint:
    model, step = load_supernet(cfg, str(workdir), space)
  pretrained = bool(cfg.get('train', {}).get('init_from', ''))
  if step is None:
    if not (allow_untrained or pretrained):
      raise UserError(
          f'no trained supernet in {ckpt}: run `elastic-jax train --config=<config> '
          f'--workdir={workdir}` first (or `elastic-jax run`, which trains, searches and '
          'exports); search.allow_untrained=True searches the untrained initialisation')
    model = model or load_supernet(cfg, None, space)[0]
  return model, step


def _seeds(sc: SearchConfig, space, fitness: Fitness, budgets: Budgets,
           extremes: dict[str, np.ndarray]):
  """(genomes, minimised fitness) the population starts with: the smallest / largest
  architectures (search.seed_extremes) and those of search.seed_archs, the ones within the
  budgets, each network once; (None, None) when there are none."""
  genomes, natural = [], []
  if sc.seed_extremes:
    genomes.append(genomes_lib.extreme_genomes(space))
    natural.append(np.stack([extremes[n] for n in fitness.names], axis=1))
  if sc.seed_archs:
    given = seed_genomes(sc.seed_archs, space)
    values = fitness.evaluate(given)
    genomes.append(given)
    natural.append(np.stack([values[n] for n in fitness.names], axis=1))
  if not genomes:
    return None, None
  genomes, natural = np.concatenate(genomes), np.concatenate(natural)
  ok = budgets.feasible(genomes) if budgets else np.ones(len(genomes), bool)
  keys = genomes_lib.canonical_genomes_host(space, genomes)
  first = np.zeros(len(genomes), bool)
  first[np.unique(keys, axis=0, return_index=True)[1]] = True
  keep = ok & first
  if keep.sum() > sc.pop_size:
    raise UserError(f'search.seed_archs: {int(keep.sum())} distinct seed architectures within '
                    f'the budgets (with the extremes) do not fit in search.pop_size='
                    f'{sc.pop_size}; raise pop_size or seed fewer')
  return genomes[keep], fitness.to_minimised(natural)[keep]


def seed_genomes(path: str, space) -> np.ndarray:
  """The genomes of the architectures in the file `path` (search.seed_archs)."""
  archs = arch_lib.load_all(path, space.cfg)
  return np.stack([np.asarray(space.encode(a)) for a in archs])


def run_search(cfg, workdir: str | Path, *, model=None, supernet_step: int | None = None,
               log: Callable[[str], None] = _log_stderr) -> dict:
  """Runs (or resumes, or just re-reports) the configured search; writes W/search/.

  `model`: search this supernet instead of loading W's latest trained one (tests, benches).
  Returns {'pareto': the pareto.json dict, 'table': the front as text, 'plot', 'summary',
  'pareto_json', 'history' paths, 'hypervolume', 'generations', 'n_evals', 'seconds',
  'fitness_traces' (traces of the fitness in this call: 1 for a fresh search, 0 when an equal
  search already compiled the loop in this process)}.
  """
  from elastic_jax import workdir as workdir_lib  # noqa: PLC0415

  sc = search_config(cfg)
  space = workdir_lib.build_space(cfg)  # a bad config fails before the workdir is touched
  if sc.seed_archs:
    seed_genomes(sc.seed_archs, space)  # as does a missing or bad seed file
  from elastic_jax import data as data_lib  # noqa: PLC0415
  data_lib.check_lm_task(cfg.data)
  check_layout(cfg, sc)
  is_main = jax.process_index() == 0
  with workdir_lib.cleanup_on_failure(workdir) if is_main else contextlib.nullcontext():
    if is_main and not (Path(workdir) / workdir_lib.CONFIG_FILE).is_file():
      workdir_lib.save_config(workdir, cfg)  # later commands find the config in W
    return _run_search(cfg, workdir, sc, model, supernet_step, log)


def check_layout(cfg, sc: SearchConfig | None = None) -> None:
  """The population forward's plan on the config's mesh (`placement.eval_plan`), before
  anything is loaded, trained or written: a mesh whose batch axes do not divide the validation
  batch, or a logits bound below one sequence's logits, is one UserError line."""
  sc = sc or search_config(cfg)
  if any(get_objective(n).needs_model for n in sc.objectives):
    placement.eval_plan(sc.chunk, sc.max_logits_mib, int(cfg.data.batch_size),
                        int(cfg.data.seq_len), int(cfg.model.vocab_size),
                        placement.search_mesh(cfg))


def _run_search(cfg, workdir, sc: SearchConfig, model, supernet_step, log) -> dict:
  from elastic_jax.search import report  # noqa: PLC0415
  from elastic_jax.workdir import build_space  # noqa: PLC0415

  is_main = jax.process_index() == 0

  space = build_space(cfg, workdir)
  register_proxies(sc.objectives, cfg.get('proxy', None))
  strategy = resolve_strategy(sc)
  budgets = Budgets(space, dict(sc.budgets))
  share = budgets.check(seed=sc.seed)  # UserError naming the smallest achievable value
  if share < 0.02:
    log(f'warning: only {share:.1%} of random architectures meet search.budgets; the search '
        'may propose few feasible children (raise search.tries or the budgets)')
  if model is None and training_free(sc.objectives):
    from elastic_jax.workdir import init_supernet  # noqa: PLC0415
    log('search: every objective is zero-cost; scoring the seeded initialisation (no training '
        'needed)')
    model, supernet_step = init_supernet(cfg, space), None
  elif model is None:
    model, supernet_step = load_trained_supernet(cfg, workdir, space, sc.allow_untrained)
  # A training-free search scores no data-dependent metric: nothing to re-score on held-out data
  # (and its proxies need all their minibatches).
  holdout = 0 if training_free(sc.objectives) else sc.holdout_batches
  batches, heldout = validation_batches(cfg, holdout, log,
                                        _scone_transform(cfg, workdir))
  # The trainer's mesh and shardings; every process takes part in each evaluation.
  mesh = placement.search_mesh(cfg)
  program = search_program.build(sc, space, mesh, model=model, batches=batches)
  fitness, searcher = program.fitness, program.searcher
  if program.plan is not None:
    plan = program.plan
    log(f'search: population forward on mesh {dict(mesh.shape)} over {jax.process_count()} '
        f'process(es), {plan.chunk} arch(s) at a time, {plan.micro_batches} micro-batch(es) per '
        f'validation batch, {plan.logits_bytes / placement.MIB:.1f} MiB of logits per device '
        f'(search.max_logits_mib={sc.max_logits_mib:g})')
  out_dir = Path(workdir) / SEARCH_DIR
  ckpt_path = out_dir / CHECKPOINT_FILE
  fp = fingerprint(cfg, sc, space, supernet_step)
  # The smallest and largest architectures: baselines of the report, and the reference point of
  # objectives without an analytic one (the loss).
  report_names = tuple(dict.fromkeys(REPORT_METRICS + fitness.names))
  extremes = fitness.extremes(report_names)
  ref_nat = fitness.reference_point(sc.ref_point, extremes)
  if not np.all(np.isfinite(ref_nat)):
    raise UserError(f'no hypervolume reference point for objectives {list(fitness.names)}: '
                    f'set search.ref_point (got {ref_nat.tolist()})')

  progress = (checkpoint.resume(ckpt_path, fp, sc.generations, supernet_step, log)
              if sc.resume else None)
  if progress is None:
    state = searcher.init_state(*_seeds(sc, space, fitness, budgets, extremes))
    progress = checkpoint.Progress.start(state, sc.seed, ref_nat, len(sc.objectives), fp)
    log(f'search: {strategy} on {list(sc.objectives)}, population {sc.pop_size}, '
        f'{searcher.spec.n_children} children per generation, {sc.generations} generations, '
        f'supernet step {supernet_step}')

  history_path = out_dir / 'history.jsonl'
  digest = results_digest(fp, sc, progress.generation)
  done = (report.load_finished(out_dir, digest) if progress.generation >= sc.generations
          else None)
  if done is not None:
    # The same search, already finished and reported: report it again as it is (measuring the
    # latency again would rewrite pareto.json with other numbers).
    log(f'search: {out_dir / report.PARETO_FILE} already holds this search '
        f'({progress.generation} generations); reporting it unchanged')
    paths = (report.write_all(out_dir, done, progress.history, fitness.names, only_missing=True)
             if is_main else report.output_paths(out_dir))
    return _result(done, paths, progress, fitness)
  while progress.generation < sc.generations:
    n = min(sc.checkpoint_every, sc.generations - progress.generation)
    evals_before = int(progress.state.n_evals)
    start = time.perf_counter()
    state, h = searcher.advance(progress.state, progress.key, progress.generation, n)
    seconds = time.perf_counter() - start
    progress.record(state, h, seconds, fitness, searcher.warmup_generations, sc.generations)
    if is_main:  # one search state on every process; process 0 writes it
      progress.save(ckpt_path)
      report.write_history(history_path, progress.history, fitness.names)
    hist = progress.history
    evals = int(hist['n_evals'][-1])
    log(f'search: generation {progress.generation}/{sc.generations}, {evals} evaluations, '
        + ', '.join(f'best {k} {v:.4g}' for k, v in zip(fitness.names, hist['best'][-1]))
        + (f', hypervolume {hist["hv"][-1]:.4g}' if len(fitness.names) > 1 else '')
        + f', {(evals - evals_before) / seconds:.1f} distinct archs/s')

  heldout_data = fitness.data_of(model, heldout, mesh) if heldout else None
  # Latency is measured (on this host's device) by the process that writes the report.
  pareto = pareto_lib.build_pareto(sc if is_main else dataclasses.replace(sc, latency=False),
                                   space, fitness, model, batches, progress, supernet_step,
                                   strategy, extremes, log, heldout=heldout_data)
  pareto['results_digest'] = results_digest(fp, sc, progress.generation)
  paths = (report.write_all(out_dir, pareto, progress.history, fitness.names) if is_main
           else report.output_paths(out_dir))
  return _result(pareto, paths, progress, fitness)


def _result(pareto, paths, progress, fitness) -> dict:
  from elastic_jax.search import report  # noqa: PLC0415
  return {'pareto': pareto, 'table': report.format_table(pareto), **paths,
          'hypervolume': pareto['hypervolume'], 'generations': progress.generation,
          'n_evals': pareto['n_evals'], 'seconds': pareto['search_seconds'],
          'fitness_traces': fitness.traces}


def _scone_transform(cfg, workdir):
  """A SCONE run's f-gram lookup for the validation batches (None without SCONE): sub-networks
  are scored with their f-gram embeddings, computed by the f-gram model on the device (the
  training-mode forward, which the precomputed table reproduces exactly)."""
  from elastic_jax.scone import job as scone_job  # noqa: PLC0415
  from elastic_jax.scone.config import scone_config  # noqa: PLC0415

  scfg = scone_config(cfg.get('scone'))
  if scfg is None:
    return None
  return scone_job.batch_transform(scone_job.run_fgrams(scfg, cfg.data, workdir, write=False))
