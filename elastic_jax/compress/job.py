"""`elastic-jax compress --model DIR --workdir W --budgets params=0.3,0.5,0.7`.

Compression of a pre-trained model by search, resumable at every stage:
  1 import     the checkpoint becomes W (elastic_jax/hf/importer.py)
  2 sort       importance sorting of the original (elastic_jax/compress/sort.py)
  3 finetune   supernet fine-tuning from the sorted original (the train job; compress.sampling,
               by default every step trains one anchor per budget, the uniform model with the
               lowest loss near it (`choose_anchors`); the original as external teacher or
               in-place distillation)
  4 search     loss vs params (the search job; search.objectives may add latency / FLOPs)
  5 export     the best searched model under each budget, native and `hf` format
  6 baselines  pruning baselines at the searched models' sizes (elastic_jax/compress/pruning.py):
               (a) pruned only, (b) pruned then fine-tuned with the same steps, batch and
               teacher; (a') and (b') the same for the rule's own model at each budget
               (compress.budget_baselines)
  7 report     every model's perplexity on the held-out validation split and forward latency:
               W/compress/summary.json, summary.md and front.png (the searched front with the
               baselines and the original marked)
W/compress/stages.json records finished stages; the train and search jobs resume themselves.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np

from elastic_jax import arch as arch_lib
from elastic_jax import atomic, data, evaluation, latency
from elastic_jax import export as export_lib
from elastic_jax.compress import config as compress_config
from elastic_jax.compress import pruning
from elastic_jax.compress.sort import pretrained_dir, run_sort
from elastic_jax.errors import UserError
from elastic_jax.workdir import (
  apply_init_from,
  build_space,
  cleanup_on_failure,
  init_supernet,
  load_config,
  load_supernet,
  save_config,
  save_export,
)

COMPRESS_DIR = 'compress'
STAGES_FILE = 'stages.json'
STAGES = ('import', 'sort', 'finetune', 'search', 'export', 'baselines', 'report')


def _stderr(msg: str) -> None:
  import sys  # noqa: PLC0415
  print(msg, file=sys.stderr, flush=True)


def parse_budgets(spec: str, original_params: int | None,
                  field: str = '--budgets') -> list[tuple[str, int]]:
  """'params=0.3,0.5,0.7' -> [(label, parameter count)]; values <= 1 are fractions of the
  original, larger ones whole counts (k/M/G suffixes accepted), each below the original's
  `original_params` (None: the form alone is checked, before the original is read). `field`:
  where the spec came from, for the messages (the flag, or 'config field compress.budgets')."""
  from elastic_jax.search.pick import parse_number  # noqa: PLC0415
  spec = (spec or '').strip()
  if not spec.startswith('params='):
    raise UserError(f'{field} {spec!r} is not understood; expected params=F[,F...], fractions '
                    'of the original (0.3) or parameter counts (50M)')
  out = []
  for part in spec[len('params='):].split(','):
    value = parse_number(part)
    if not (math.isfinite(value) and value > 0):
      raise UserError(f'{field}: {part!r} must be a positive number')
    if value > 1 and not float(value).is_integer():
      raise UserError(f'{field}: {part!r} is neither a fraction of the original (<= 1) nor a '
                      'whole parameter count')
    count = int(round(value * (original_params or 1))) if value <= 1 else int(value)
    label = f'{value:g}' if value <= 1 else part.strip()
    if original_params is not None and count >= original_params:
      raise UserError(f'{field}: params={label} ({count:,} parameters) is not below the '
                      f"original's {original_params:,}: nothing to compress")
    if original_params is not None and count in [seen for _, seen in out]:
      raise UserError(f'{field}: params={label} asks for {count:,} parameters again')
    out.append((label, count))
  return out


class Stages:
  """W/compress/stages.json: which stages are done, with their results."""

  def __init__(self, workdir: Path):
    self.path = workdir / COMPRESS_DIR / STAGES_FILE
    self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

  def finish(self, stage: str, result) -> None:
    self.done[stage] = result
    atomic.write_text(self.path, json.dumps(self.done, indent=2) + '\n')


def _import(model_dir, workdir: Path, user_cfg, gguf, log) -> None:
  from elastic_jax.hf.importer import REPORT, import_workdir  # noqa: PLC0415
  source = Path(gguf if gguf is not None else model_dir).resolve() if (gguf or model_dir) else None
  report_path = workdir / REPORT
  if report_path.is_file():
    recorded = json.loads(report_path.read_text()).get('source')
    if source is not None and recorded != str(source):
      raise UserError(f'{workdir} was imported from {recorded}, not {source}; compress into a '
                      'new workdir (or pass the same --model)')
    return
  if source is None:
    raise UserError(f'{workdir} has no imported model; pass --model DIR (or --gguf FILE)')
  cfg = ml_collections.ConfigDict() if user_cfg is None else copy.deepcopy(user_cfg)
  if 'hf' not in cfg:
    cfg.hf = ml_collections.ConfigDict()
  cfg.hf.layer_subsets = cfg.hf.get('layer_subsets', True)  # search may drop any layer
  import_workdir(model_dir, workdir, user_cfg=cfg, gguf=gguf, log=log)


def _finetune_config(cfg, workdir: Path, c) -> ml_collections.ConfigDict:
  cfg = copy.deepcopy(cfg)
  cfg.train.sampling = str(c.sampling)  # c: checked by compress_config.section
  if c.teacher == 'original':
    # The losses are train.distill's (logits KL by default; hidden-state MSE and the others as
    # configured, e.g. for an encoder whose checkpoint has no trained LM head).
    cfg.train.distill.teacher = str(pretrained_dir(cfg, workdir))
  return cfg


def original_model(cfg, space):
  """The supernet holding the (sorted) original's weights, not fine-tuned."""
  model = init_supernet(cfg, space)
  apply_init_from(str(pretrained_dir(cfg, None)), model, space)
  return model


def _baseline_finetune(cfg, workdir: Path, arch_json: dict, out: Path, log) -> Path:
  """Fine-tunes the pruned model alone (same steps, batch and teacher as the supernet)."""
  from elastic_jax.train.trainer import train as train_job  # noqa: PLC0415
  run_dir = out.parent / f'.train_{out.name}'
  run_dir.mkdir(parents=True, exist_ok=True)
  arch_path = run_dir / 'arch.json'
  arch_path.write_text(json.dumps(arch_json) + '\n')
  bcfg = copy.deepcopy(cfg)
  bcfg.train.sampling = 'fixed'
  bcfg.train.arch = str(arch_path)
  bcfg.train.eval_archs = (str(arch_path),)
  if not bcfg.train.distill.teacher:  # in-place has no teacher here: the original teaches
    bcfg.train.distill.teacher = str(pretrained_dir(cfg, workdir))
  log(f'compress: baselines: fine-tuning the pruned model {out.name} ({bcfg.train.steps} steps)')
  train_job(bcfg, run_dir, progress=False)
  space = build_space(bcfg)
  model, _ = load_supernet(bcfg, str(run_dir), space)
  return _save(model, space, arch_json, bcfg, out)


def _save(model, space, arch_json: dict, cfg, out: Path, fmt: str = 'native') -> Path:
  from elastic_jax.hf.importer import original_hf_config  # noqa: PLC0415
  arch = arch_lib.from_json(arch_json, space.cfg)
  dense = export_lib.export(model, space.cfg, arch)
  save_export(dense, out, cfg.data, arch=arch, fmt=fmt, hf_base=original_hf_config(cfg),
              extra={'data': cfg.data.to_dict()}, overwrite=True)  # a stage's own output
  return out


def measure(directory: Path, batches, latency_rows: int) -> dict:
  dense, config = export_lib.load(directory)
  result = evaluation.evaluate(dense, batches)
  one = {k: v[:latency_rows] for k, v in batches[0].items()}
  return {'dir': str(directory), 'params': int(config['params']), 'loss': result['loss'],
          'ppl': result['perplexity'], 'latency_ms': latency.forward_ms(dense, one),
          'arch': config.get('source_arch')}


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
  """Exact 2-D hypervolume of (perplexity, params) points (both minimised) below `ref`."""
  from elastic_jax.search.hypervolume import hypervolume_nd  # noqa: PLC0415
  if not points:
    return 0.0
  return float(hypervolume_nd(np.asarray(points, np.float64), np.asarray(ref, np.float64)))


# The models given the same fine-tuning tokens; their worst perplexity sets the reference point.
FINETUNED = ('search', 'pruned_finetuned', 'budget_pruned_finetuned')


def hypervolumes(budgets: dict, original_params: int) -> dict:
  """{hv_ref, hv_search, hv_pruning, hv_pruned_only[, hv_budget_pruning]} of the report's models
  (`budgets`: label -> {model name -> {'ppl', 'params'}}). The reference point is 1.1 x the worst
  perplexity of the models fine-tuned with the same tokens, and the original's parameter count:
  a pruned-only model far above it (perplexity in the millions) adds nothing, instead of moving
  the reference so far that every front's hypervolume agrees to six digits."""
  pts = lambda name: [(e[name]['ppl'], e[name]['params']) for e in budgets.values()
                      if name in e]
  ref = (max(p for name in FINETUNED for p, _ in pts(name)) * 1.1, float(original_params))
  out = {'hv_ref': list(ref), 'hv_search': hypervolume(pts('search'), ref),
         'hv_pruning': hypervolume(pts('pruned_finetuned') or pts('pruned'), ref),
         'hv_pruned_only': hypervolume(pts('pruned'), ref)}
  if pts('budget_pruned_finetuned'):
    out['hv_budget_pruning'] = hypervolume(pts('budget_pruned_finetuned'), ref)
  return out


def _write_archs(workdir: Path, name: str, archs: list[dict]) -> Path:
  path = workdir / COMPRESS_DIR / f'{name}.jsonl'
  atomic.write_text(path, ''.join(json.dumps(a) + '\n' for a in archs))
  return path


def pruning_rule(space, workdir: Path) -> pruning.PruningRule:
  """The pruning rule over `space` with the sort stage's layer ranking."""
  from elastic_jax.compress.sort import load_scores  # noqa: PLC0415
  return pruning.PruningRule(space, load_scores(workdir)[1]['layer_order'])


def choose_anchors(cfg, space, rule: pruning.PruningRule, workdir: Path, budget_list,
                   log) -> list[dict]:
  """The archs compress's anchored fine-tuning trains every step, one per budget (smallest
  budget first; each shape once), by compress.anchors; 'loss' also writes every candidate's loss to
  W/compress/anchors.json."""
  from elastic_jax.compress.sort import calibration_batches  # noqa: PLC0415
  c = compress_config.section(cfg)  # anchors, anchor_low and anchor_candidates checked there
  counts = sorted(count for _, count in budget_list)
  if c.anchors == 'pruning':
    return [rule.pick(count)[0] for count in counts]
  per_budget = [rule.shapes_near(count, float(c.anchor_low), int(c.anchor_candidates))
                for count in counts]
  flat = [a for shapes in per_budget for a, _ in shapes]
  log(f'compress: choosing anchors: {len(flat)} uniform models near the budgets scored on '
      f'{c.calibration_batches} calibration batches')
  stacked = arch_lib.stack([arch_lib.from_json(a, space.cfg) for a in flat])
  losses = evaluation.evaluate_population(original_model(cfg, space),
                                          calibration_batches(cfg, int(c.calibration_batches)),
                                          stacked)['loss']
  anchors, report, at = [], [], 0
  for count, shapes in zip(counts, per_budget, strict=True):
    scored = [{'arch': a, 'params': params, 'loss': float(losses[at + i])}
              for i, (a, params) in enumerate(shapes)]
    at += len(shapes)
    best = min(scored, key=lambda e: e['loss'])
    anchors += [] if best['arch'] in anchors else [best['arch']]  # close budgets may share one
    report.append({'budget_params': count, 'chosen': best, 'candidates': scored})
  atomic.write_text(workdir / COMPRESS_DIR / 'anchors.json', json.dumps(report, indent=1) + '\n')
  return anchors


def _write_seeds(cfg, rule: pruning.PruningRule, workdir: Path, budget_list,
                 original_params: int, first: list[dict]) -> Path:
  """W/compress/seed_archs.jsonl: the models the search starts from (see compress.seed_search):
  `first` (the anchors), then the pruning rule's models at the budgets and between them, each
  shape once, within half the population (the rest starts random)."""
  from elastic_jax.search.config import search_config  # noqa: PLC0415
  counts = sorted(count for _, count in budget_list)
  between = [(a + b) / 2 for a, b in zip(counts, counts[1:] + [original_params], strict=True)]
  limit = max(1, search_config(cfg).pop_size // 2)
  archs = list(first)
  for a in rule.seeds(counts + between, limit):
    archs += [] if a in archs else [a]
  return _write_archs(workdir, 'seed_archs', archs[:limit])


def _budgets_field(flag: str | None) -> str:
  return '--budgets' if flag else 'config field compress.budgets'


def run_compress(model_dir: str | Path | None, workdir: str | Path, *,
                 budgets: str | None = None, user_cfg: ml_collections.ConfigDict | None = None,
                 gguf: str | Path | None = None,
                 log: Callable[[str], None] = _stderr) -> dict:
  """Runs (or resumes) every stage; returns the summary (also W/compress/summary.json). A run
  that fails before the fine-tuning's first checkpoint leaves W as it found it (the import and
  sort it made removed: a rerun with a corrected config starts over from them)."""
  # Every compress.* value and the budgets' form are checked before any work (the import reads
  # the whole checkpoint): the config the stages will read is W's own once W holds an import
  # (a rerun resumes with it), else the one the import is about to write there.
  from elastic_jax.hf.importer import REPORT  # noqa: PLC0415
  imported = (Path(workdir) / REPORT).is_file()
  c = compress_config.section(load_config(workdir) if imported else user_cfg)
  parse_budgets(budgets or str(c.budgets), None, _budgets_field(budgets))
  with cleanup_on_failure(workdir):
    return _run_stages(model_dir, Path(workdir), budgets=budgets, user_cfg=user_cfg, gguf=gguf,
                       log=log)


def _run_stages(model_dir, workdir: Path, *, budgets, user_cfg, gguf, log) -> dict:
  from elastic_jax.search.job import run_search  # noqa: PLC0415
  from elastic_jax.search.pick import export_pick  # noqa: PLC0415
  from elastic_jax.search.report import load_pareto  # noqa: PLC0415
  from elastic_jax.train.trainer import train as train_job  # noqa: PLC0415

  out_dir = workdir / COMPRESS_DIR
  _import(model_dir, workdir, user_cfg, gguf, log)
  stages = Stages(workdir)
  stages.finish('import', True) if 'import' not in stages.done else None
  cfg = load_config(workdir)
  c = compress_config.section(cfg)
  space = build_space(cfg)
  original_params = int(json.loads((workdir / 'import.json').read_text())['params'])
  budget_list = parse_budgets(budgets or str(c.budgets), original_params, _budgets_field(budgets))
  smallest = space.parameter_range()[0]
  for label, count in budget_list:
    if count < smallest:
      raise UserError(f'budget params={label} ({count:,} parameters) is below the smallest '
                      f'sub-network of the space ({smallest:,} parameters, '
                      f'{smallest / original_params:.3f} of the original); raise the budget or '
                      'widen the space (hf.* fractions)')

  log('compress: stage sort')
  run_sort(cfg, workdir, log=log)
  stages.finish('sort', True)

  ft_cfg = _finetune_config(cfg, workdir, c)
  # Every uniform candidate counted once per run, and only by a stage that needs the rule.
  rule = functools.cache(lambda: pruning_rule(space, workdir))
  if ft_cfg.train.sampling == 'anchored' and not ft_cfg.train.get('anchor_archs', ''):
    ft_cfg.train.anchor_archs = str(_write_archs(
        workdir, 'anchor_archs', choose_anchors(ft_cfg, space, rule(), workdir, budget_list, log)))
  if c.seed_search and not ft_cfg.get('search', {}).get('seed_archs', ''):
    if 'search' not in ft_cfg:
      ft_cfg.search = ml_collections.ConfigDict()
    anchors = ([arch_lib.to_json(a) for a in arch_lib.load_all(ft_cfg.train.anchor_archs,
                                                               space.cfg)]
               if ft_cfg.train.sampling == 'anchored' else [])
    ft_cfg.search.seed_archs = str(_write_seeds(ft_cfg, rule(), workdir, budget_list,
                                                original_params, anchors))
  save_config(workdir, ft_cfg)  # what the later stages (and commands on W) run with
  if 'finetune' not in stages.done:
    log(f'compress: stage finetune ({ft_cfg.train.steps} steps, sampling '
        f'{ft_cfg.train.sampling}, teacher {c.teacher})')
    trained = train_job(ft_cfg, workdir)
    stages.finish('finetune', {k: trained[k] for k in ('step', 'seconds')})

  log('compress: stage search')
  run_search(ft_cfg, workdir, log=log)
  stages.finish('search', True)
  pareto = load_pareto(workdir)

  models = out_dir / 'models'
  searched = {}
  for label, count in budget_list:
    native = models / f'search_{label}'
    if not (native / export_lib.CONFIG_FILE).is_file():
      spec = f'best-under:params={count}'
      # A stage's own outputs: an interrupted run may have written one of the two.
      export_pick(ft_cfg, workdir, spec, out=native, overwrite=True)
      export_pick(ft_cfg, workdir, spec, out=models / f'search_{label}_hf', fmt='hf',
                  overwrite=True)
    searched[label] = native
  stages.finish('export', {k: str(v) for k, v in searched.items()})

  baselines = {}
  if c.baselines:
    original = None
    budget_of = dict(budget_list)
    for label, native in searched.items():
      target = export_lib.read_config(native)['params']
      arch_json, _ = rule().pick(target)
      entry = {}
      # (a)/(b) at the searched model's count; with c.budget_baselines also the rule's own model
      # at the budget, whose shape is chosen by the budget alone (the same model when they agree).
      shapes = [('', arch_json)]
      if c.budget_baselines:
        shapes.append(('budget_', rule().pick(budget_of[label])[0]))
      for prefix, shape in shapes:
        if prefix and shape == arch_json:
          entry[f'{prefix}pruned'] = entry['pruned']
          entry[f'{prefix}pruned_finetuned'] = entry['pruned_finetuned']
          continue
        pruned = models / f'{prefix}pruned_{label}'
        tuned = models / f'{prefix}pruned_finetuned_{label}'
        if not (pruned / export_lib.CONFIG_FILE).is_file():
          original = original if original is not None else original_model(ft_cfg, space)
          _save(original, space, shape, ft_cfg, pruned)
        if not (tuned / export_lib.CONFIG_FILE).is_file():
          _baseline_finetune(ft_cfg, workdir, shape, tuned, log)
        entry[f'{prefix}pruned'], entry[f'{prefix}pruned_finetuned'] = pruned, tuned
      baselines[label] = entry
    stages.finish('baselines', {k: {n: str(p) for n, p in v.items()} for k, v in
                                baselines.items()})

  log('compress: stage report (perplexity on the held-out validation split, latency)')
  batches = data.eval_batches(ft_cfg.data)
  rows = int(c.latency_batch)
  summary = {'source': json.loads((workdir / 'import.json').read_text())['source'],
             'eval_data': f"{ft_cfg.data.get('source', 'corpus')}: validation split "
                          f'({len(batches)} batches of {ft_cfg.data.batch_size} x '
                          f'{ft_cfg.data.seq_len} tokens; fine-tuning reads the train split)',
             'finetune_steps': int(ft_cfg.train.steps),
             'finetune_tokens': int(ft_cfg.train.steps) * int(ft_cfg.data.batch_size)
                                * int(ft_cfg.data.seq_len),
             'original': measure(pretrained_dir(cfg, workdir), batches, rows), 'budgets': {}}
  measured = {}  # a model two baselines share is measured once
  for label, count in budget_list:
    entry = {'budget_params': count, 'search': measure(searched[label], batches, rows)}
    for name, path in baselines.get(label, {}).items():
      if path not in measured:
        measured[path] = measure(path, batches, rows)
      entry[name] = measured[path]
    summary['budgets'][label] = entry
  summary.update(hypervolumes(summary['budgets'], original_params))
  from elastic_jax.compress import report  # noqa: PLC0415
  report.write(out_dir, summary, pareto)
  stages.finish('report', True)
  return summary
