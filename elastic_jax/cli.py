"""The `elastic-jax` command: parses flags, calls library functions, prints results.

  elastic-jax COMMAND --config=configs/X.py[:arg] [--config.a.b=v ...] [--workdir=W] [flags]

Bad input raises `UserError` anywhere below; it is printed as one line and the exit code is 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from elastic_jax.errors import UserError

COMMANDS = {}


def command(fn):
  COMMANDS[fn.__name__.rstrip('_').replace('_', '-')] = fn
  return fn


def _make_flags() -> flags.FlagValues:
  """Fresh flags for each invocation (config override flags depend on the config loaded)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Experiment config file, configs/X.py[:arg].',
                                  flag_values=fv, lock_config=False)
  flags.DEFINE_string('workdir', None, 'Working directory of the run.', flag_values=fv)
  flags.DEFINE_string('arch', None, "Architecture JSON file, or 'largest' / 'smallest'.",
                      flag_values=fv)
  flags.DEFINE_enum('format', 'native', ['native', 'hf'], 'export: native (config.json + '
                    'model.safetensors) or hf (a directory transformers loads).', flag_values=fv)
  flags.DEFINE_string('gguf', None, 'import-hf: a GGUF file to dequantise and import (hf extra).',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'Output directory.', flag_values=fv)
  flags.DEFINE_string('model', None, 'Directory of an exported dense model (import-hf: a Hugging '
                      'Face model directory).', flag_values=fv)
  flags.DEFINE_integer('n', 1, 'Number of architectures.', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'Random seed.', flag_values=fv)
  flags.DEFINE_integer('max_params', None, 'Parameter budget for sampling.', flag_values=fv)
  flags.DEFINE_string('pick', None, 'Front member to export: index:N | knee | '
                      'best-under:params=N (see elastic_jax/search/pick.py).', flag_values=fv)
  flags.DEFINE_string('budgets', None, 'compress: params=0.3,0.5,0.7 (fractions of the '
                      'original or counts).', flag_values=fv)
  flags.DEFINE_string('topology', None, 'TPU slice to compile for: CHIP:AxB (v5e, v6e) or '
                      'CHIP:AxBxC (v4, v5p), e.g. v5e:4x4.', flag_values=fv)
  return fv


FLAGS = _make_flags()


def _loaded_config():
  """--config, loaded (config_flags loads lazily, so a missing or failing file surfaces here)."""
  try:
    cfg = FLAGS.config
    if cfg is not None:
      cfg.keys()  # a config that failed to load raises on first use
    return cfg
  except OSError as e:
    reason = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    raise UserError(f'could not load --config: {reason}') from None


def _config():
  from elastic_jax.workdir import resolve_config
  return resolve_config(FLAGS.workdir, _loaded_config())


def _print_json(obj) -> None:
  print(json.dumps(obj))


@command
def info():
  """The search space: number of architectures, parameter range, smallest and largest arch."""
  from elastic_jax.workdir import build_space
  _print_json(build_space(_config()).describe())


@command
def sample():
  """N architectures as JSON lines (uniform, or uniform under --max_params)."""
  import jax

  from elastic_jax import arch as arch_lib
  from elastic_jax.workdir import build_space
  if FLAGS.n < 1:
    raise UserError(f'--n={FLAGS.n} must be >= 1')
  space = build_space(_config())
  archs = space.sample(jax.random.key(FLAGS.seed), FLAGS.n, max_params=FLAGS.max_params)
  for a in arch_lib.unstack(archs):
    print(arch_lib.dumps(a))


def _require(flag: str):
  value = getattr(FLAGS, flag)
  if not value:
    raise UserError(f'--{flag} is required for `elastic-jax {sys.argv[1]}`')
  return value


def _supernet_and_arch(cfg):
  from elastic_jax import arch as arch_lib
  from elastic_jax.workdir import build_space, load_supernet
  space = build_space(cfg)
  name = _require('arch')
  if name in ('largest', 'smallest'):
    arch = space.largest() if name == 'largest' else space.smallest()
  else:
    arch = arch_lib.load(name, space.cfg)
  model, step = load_supernet(cfg, FLAGS.workdir, space)
  return space, model, arch, step


def _print_front(result) -> None:
  """The searched front as a table, then where the files are (stdout)."""
  print(result['table'])
  print(f"hypervolume {result['hypervolume']:.6g} after {result['n_evals']} evaluations "
        f"({result['generations']} generations)")
  print(f"plot: {result['plot']}\nsummary: {result['summary']}\nfront: {result['pareto_json']}")


@command
def search():
  """Searches the supernet trained in --workdir; writes W/search/ (front, history, plot)."""
  from elastic_jax.search.job import run_search
  _print_front(run_search(_config(), _require('workdir')))


@command
def export():
  """Exports --arch (supernet of --workdir or --config), or --pick from the searched front;
  --format=hf writes a directory transformers loads."""
  from elastic_jax import export as export_lib
  from elastic_jax.hf.importer import original_hf_config
  cfg = _config()
  if FLAGS.pick:
    if FLAGS.arch:
      raise UserError('pass either --arch or --pick, not both')
    from elastic_jax.search.pick import export_pick
    _print_json(export_pick(cfg, _require('workdir'), FLAGS.pick, out=FLAGS.out,
                            fmt=FLAGS.format))
    return
  out = Path(_require('out'))
  space, model, arch, step = _supernet_and_arch(cfg)
  dense = export_lib.export(model, space.cfg, arch)
  saved = export_lib.save_with_tokenizer(
      dense, out, cfg.data, arch=arch, fmt=FLAGS.format, hf_base=original_hf_config(cfg),
      extra={'data': cfg.data.to_dict(), 'supernet_step': step})
  _print_json({**saved, 'supernet_step': step})


@command
def evaluate():
  """Validation loss of --arch in the supernet, or of the exported model --model."""
  import ml_collections

  from elastic_jax import data, evaluation
  from elastic_jax import export as export_lib
  from elastic_jax.cost import arch_cost, dense_arch
  if FLAGS.model:
    dense, saved = export_lib.load(FLAGS.model)
    loaded = _loaded_config()
    if loaded:
      data_cfg = loaded.data
    else:  # the data the model was trained on, tokenized by the tokenizer exported with it
      data_cfg = ml_collections.ConfigDict(saved['data'])
      tokenizer = Path(FLAGS.model) / 'tokenizer.json'
      if tokenizer.is_file():
        data_cfg.tokenizer = str(tokenizer)
    batches = data.eval_batches(data_cfg)
    result = evaluation.evaluate(dense, batches)
    cost = arch_cost(dense.cfg, dense_arch(dense.dims),
                     bottleneck_head_dim=dense.dims.bottleneck_head_dim, seq_len=data_cfg.seq_len)
  else:
    cfg = _config()
    space, model, arch, _ = _supernet_and_arch(cfg)
    batches = data.eval_batches(cfg.data)
    result = evaluation.evaluate(model, batches, arch)
    cost = space.cost(arch)
  result.update(params=int(cost['params']), flops_per_token=float(cost['flops_per_token']))
  _print_json(result)


def _join_processes(cfg) -> bool:
  """Joins the other processes of a multi-process run (config section `distributed`, JAX_*
  variables, or a detected TPU pod; see elastic_jax/distributed.py) before any device is used,
  and stops every process with one line if they were given different configs. True on process 0,
  the one that prints."""
  from elastic_jax import distributed
  info = distributed.initialize(cfg)
  distributed.check_same_config(cfg, workdir=FLAGS.workdir, pick=FLAGS.pick, out=FLAGS.out)
  return info.is_main


@command
def train():
  """Trains the supernet of --config in --workdir (resumes from the workdir's checkpoints)."""
  from elastic_jax.train.trainer import train as train_job
  cfg = _config()
  workdir = _require('workdir')
  is_main = _join_processes(cfg)
  result = train_job(cfg, workdir)
  if is_main:
    _print_json(result)


@command
def compile_():
  """Compiles training and population evaluation for a TPU --topology: memory, FLOPs, MFU."""
  from elastic_jax import aot
  cfg = _config()
  report = aot.compile_report(cfg, _require('topology'))
  print(aot.format_report(report), file=sys.stderr)
  _print_json(report)
  aot.check_fits(report)  # exit 2 with one line if a program does not fit in HBM


@command
def proxy():
  """Every zero-cost proxy's score of --arch, or of --n archs sampled with --seed (at init)."""
  import jax

  from elastic_jax import arch as arch_lib
  from elastic_jax import data, proxies
  from elastic_jax.workdir import build_space, init_supernet
  cfg = _config()
  space = build_space(cfg)
  if FLAGS.arch:
    archs = arch_lib.stack([arch_lib.load(FLAGS.arch, space.cfg)])
  else:
    if FLAGS.n < 1:
      raise UserError(f'--n={FLAGS.n} must be >= 1')
    archs = space.sample(jax.random.key(FLAGS.seed), FLAGS.n, max_params=FLAGS.max_params)
  proxy_cfg = cfg.get('proxy', None) or proxies.default_config()
  scores = proxies.score_archs(init_supernet(cfg, space), space, archs,
                               data.eval_batches(cfg.data), proxy_cfg)
  for record in proxies.as_records(archs, scores):
    _print_json(record)


@command
def run():
  """The whole job in --workdir: train -> search -> export (--pick, else search.export_pick)."""
  from elastic_jax.search.job import run_search, search_config
  from elastic_jax.search.pick import export_pick, parse_pick
  from elastic_jax.train.trainer import train as train_job
  cfg = _config()
  workdir = _require('workdir')
  pick = FLAGS.pick or search_config(cfg).export_pick
  parse_pick(pick)  # a bad --pick fails now, not after training and search
  is_main = _join_processes(cfg)
  trained = train_job(cfg, workdir)
  if not is_main:
    # Every process searches (the same computation on its own devices; the files it writes are
    # identical and replaced atomically), so all finish together; process 0 exports and prints.
    run_search(cfg, workdir, log=lambda _: None)
    return
  print(f"trained to step {trained['step']} in {trained['seconds']:.0f} s", file=sys.stderr)
  result = run_search(cfg, workdir)
  exported = export_pick(cfg, workdir, pick, out=FLAGS.out)
  _print_front(result)
  print(f"exported front member {exported['index']} ({pick}, {exported['params']:,} "
        f"parameters): {exported['out']}")


@command
def import_hf():
  """A Hugging Face checkpoint (--model DIR or --gguf FILE) becomes workdir --out."""
  from elastic_jax.hf.importer import import_workdir
  report = import_workdir(FLAGS.model, _require('out'), user_cfg=_loaded_config(),
                          gguf=FLAGS.gguf, log=lambda m: print(m, file=sys.stderr))
  _print_json({k: report[k] for k in ('source', 'model_type', 'params', 'initialised',
                                      'not_imported', 'seconds')} | {'workdir': FLAGS.out})


@command
def sort():
  """Sorts the imported model of --workdir by importance (W/sort/: scores, permutations)."""
  from elastic_jax.compress.sort import run_sort
  report = run_sort(_config(), _require('workdir'), log=lambda m: print(m, file=sys.stderr))
  _print_json({k: report[k] for k in ('method', 'layer_method', 'tokens', 'layer_order')})


@command
def compress():
  """Compresses --model (or --gguf) in --workdir: import, sort, fine-tune, search, export
  under --budgets, pruning baselines, W/compress/summary.md (resumable)."""
  from elastic_jax.compress.job import run_compress
  summary = run_compress(FLAGS.model, _require('workdir'), budgets=FLAGS.budgets,
                         user_cfg=_loaded_config(), gguf=FLAGS.gguf)
  _print_json({k: summary[k] for k in ('hv_search', 'hv_pruning')}
              | {'summary': str(Path(FLAGS.workdir) / 'compress' / 'summary.md')})


@command
def data_():
  """Builds (or finds cached) the config's dataset and tokenizer; prints their statistics."""
  from elastic_jax import data
  _print_json(data.describe(_config().data))


USAGE = """usage: elastic-jax COMMAND --config=configs/X.py[:arg] [--config.a.b=v] [flags]

commands:
""" + '\n'.join(f'  {name:10s} {fn.__doc__.splitlines()[0]}' for name, fn in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print(USAGE)
    return 0
  name = argv[1]
  if name not in COMMANDS:
    print(f'elastic-jax: unknown command {name!r}\n{USAGE}', file=sys.stderr)
    return 2
  global FLAGS
  FLAGS = _make_flags()
  flag_argv = ['elastic-jax'] + argv[2:]
  saved_argv, sys.argv = sys.argv, flag_argv  # config_flags reads overrides from sys.argv
  try:
    FLAGS(flag_argv)
  except (flags.Error, UserError, OSError, ValueError, TypeError) as e:
    # A bad flag, a config file that is missing or raises: its first line says what is wrong.
    lines = [l for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    print(f'elastic-jax {name}: error: {lines[0]}', file=sys.stderr)
    return 2
  finally:
    sys.argv = saved_argv
  try:
    COMMANDS[name]()
  except UserError as e:
    print(f'elastic-jax {name}: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
