"""The `elastic-jax` command: parses flags, calls library functions, prints results.

  elastic-jax COMMAND --config=configs/X.py[:arg] [--config.a.b=v ...] [--workdir=W] [flags]
  elastic-jax COMMAND --help        the command's flags and the config fields it reads
  elastic-jax --version

Each command declares the flags it takes and the config sections it reads (`@command(...)`; flag
definitions, parsing and --help are in `elastic_jax/cli_flags.py`). Bad input raises `UserError`
anywhere below; it is printed as one line and the exit code is 2.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path

from elastic_jax import __version__
from elastic_jax.cli_flags import (
    COMMANDS,
    FLAG_DEFS,
    command,
    command_help,
    loaded_config,
    make_flags,
    parse,
    usage,
)
from elastic_jax.errors import UserError

FLAGS = make_flags(FLAG_DEFS)


def _flag(name: str):
  """A flag's value, None when the running command does not take it."""
  return getattr(FLAGS, name) if name in FLAGS else None


def _loaded_config():
  return loaded_config(FLAGS)


def _config(*, continuing: bool = False):
  """The command's config: --config (checked against W/config.json when --workdir has one:
  `continuing` commands must agree on every field that defines the run, the others on the
  supernet's), else W/config.json."""
  from elastic_jax import workdir as workdir_lib
  loaded, workdir = _loaded_config(), _flag('workdir')
  if loaded is None and 'workdir' not in FLAGS:  # no workdir to read a config.json from
    raise UserError(f'--config is required for `elastic-jax {_RUNNING}` (it takes no '
                    '--workdir): pass --config=configs/X.py[:arg], the experiment config to use')
  if loaded is not None and workdir:
    workdir_lib.check_same_run(workdir, loaded, continuing=continuing)
  return workdir_lib.resolve_config(workdir, loaded)


# The persistent XLA compilation cache's size limit (JAX evicts the least recently used programs).
XLA_CACHE_BYTES = 4 << 30
RELEASE_AFTER_COMPILE_S = 2.0  # see _release_memory_after_long_compiles


def _use_compilation_cache() -> None:
  """Compiled programs persist between commands: a command that compiles what an earlier one
  compiled (evaluate, proxy or search again on the same space and shapes) loads it instead of
  compiling it. In $ELASTIC_JAX_CACHE/xla (default ~/.cache/elastic_jax/xla), at most
  XLA_CACHE_BYTES; JAX_COMPILATION_CACHE_DIR names another place (a gs:// path on TPU pods), or
  turns it off when set empty."""
  import os

  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return  # JAX read it at import
  import jax

  from elastic_jax.data.config import default_cache_root
  jax.config.update('jax_compilation_cache_dir', str(default_cache_root() / 'xla'))
  jax.config.update('jax_compilation_cache_max_size', XLA_CACHE_BYTES)


@functools.cache  # once per process: `main` may run many commands in one (tests, notebooks)
def _release_memory_after_long_compiles() -> None:
  """After every compilation of more than RELEASE_AFTER_COMPILE_S seconds, return the heap
  memory the compiler freed to the operating system (glibc's `malloc_trim`; elsewhere nothing).
  LLVM frees what it used to compile a large program, but glibc keeps the freed pages in the
  process (on the 12-layer ELM space's proxy program: 1.2 GB of 2.4 GB resident after compiling),
  so the program's run would add its buffers on top of them."""
  import ctypes
  import ctypes.util

  import jax

  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    trim = libc.malloc_trim
  except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
    return
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

  def after(event: str, seconds: float, **_) -> None:
    if event == '/jax/core/compile/backend_compile_duration' and \
        seconds > RELEASE_AFTER_COMPILE_S:
      trim(0)

  jax.monitoring.register_event_duration_secs_listener(after)


def _print_json(obj) -> None:
  print(json.dumps(obj))


def _note(message: str) -> None:
  print(f'elastic-jax {_RUNNING}: {message}', file=sys.stderr)


def _require(flag: str):
  value = _flag(flag)
  if not value:
    raise UserError(f'--{flag} is required for `elastic-jax {_RUNNING}`')
  return value


_RUNNING = ''  # the command being run, for messages


@command(flags=('workdir',))
def info():
  """The search space: number of architectures, parameter range, smallest and largest arch."""
  from elastic_jax.workdir import build_space
  _print_json(build_space(_config()).describe())


@command(flags=('workdir', 'n', 'seed', 'max_params'))
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


def _supernet_and_arch(cfg):
  from elastic_jax import arch as arch_lib
  from elastic_jax.workdir import build_space, load_supernet
  space = build_space(cfg, _flag('workdir'))
  name = _require('arch')
  if name in ('largest', 'smallest'):
    arch = space.largest() if name == 'largest' else space.smallest()
  else:
    arch = arch_lib.load(name, space.cfg)
  model, step = load_supernet(cfg, _flag('workdir'), space)
  if _flag('workdir') and step is None and not cfg.get('train', {}).get('init_from'):
    _note(f'{_flag("workdir")} has no trained supernet yet: using the seeded initialisation')
  return space, model, arch, step


def _print_front(result) -> None:
  """The searched front as a table, then where the files are (stdout)."""
  print(result['table'])
  names = result['pareto']['objectives']
  if len(names) > 1:
    print(f"hypervolume {result['hypervolume']:.6g} after {result['n_evals']} evaluations "
          f"({result['generations']} generations)")
  else:
    print(f"{result['n_evals']} evaluations ({result['generations']} generations) of "
          f"{names[0]}")
  print(f"plot: {result['plot']}\nsummary: {result['summary']}\nfront: {result['pareto_json']}")


@command(flags=('workdir',),
         sections=('seed', 'model', 'space', 'data', 'search', 'proxy', 'scone', 'mesh',
                   'distributed'))
def search():
  """Searches the supernet trained in --workdir; writes W/search/ (front, history, plot)."""
  from elastic_jax.search.job import run_search
  workdir = _require('workdir')
  cfg = _config()
  # Every process takes part in each population evaluation (the config's mesh spans them all);
  # process 0 writes the files and prints.
  is_main = _join_processes(cfg)
  result = run_search(cfg, workdir, **({} if is_main else {'log': lambda _: None}))
  if is_main:
    _print_front(result)


@command(flags=('workdir', 'arch', 'pick', 'out', 'overwrite', 'format'),
         sections=('seed', 'model', 'space', 'data', 'scone'))
def export():
  """Exports --arch (supernet of --workdir or --config), or --pick from the searched front;
  --format=hf writes a directory transformers loads."""
  from elastic_jax import export as export_lib
  from elastic_jax.hf.importer import original_hf_config
  from elastic_jax.workdir import check_exists, save_export
  if FLAGS.pick and FLAGS.arch:
    raise UserError('pass either --arch or --pick, not both')
  if FLAGS.out:
    export_lib.check_out(FLAGS.out, FLAGS.overwrite)  # before any work: never a user's files
  check_exists(FLAGS.workdir)
  cfg = _config()
  if FLAGS.pick:
    from elastic_jax.search.pick import export_pick
    _print_json(export_pick(cfg, _require('workdir'), FLAGS.pick, out=FLAGS.out,
                            fmt=FLAGS.format, overwrite=FLAGS.overwrite))
    return
  out = Path(_require('out'))
  space, model, arch, step = _supernet_and_arch(cfg)
  dense = export_lib.export(model, space.cfg, arch)
  from elastic_jax.scone.job import export_table_of_run
  saved = save_export(
      dense, out, cfg.data, arch=arch, fmt=FLAGS.format, hf_base=original_hf_config(cfg),
      extra={'data': cfg.data.to_dict(), 'supernet_step': step}, overwrite=FLAGS.overwrite,
      scone_table=export_table_of_run(cfg, model, FLAGS.workdir, arch))
  _print_json({**saved, 'supernet_step': step})


@command(flags=('workdir', 'arch', 'model'), sections=('seed', 'model', 'space', 'data', 'scone'))
def evaluate():
  """Validation loss of --arch in the supernet, or of the exported model --model (a SCONE run's
  f-gram embeddings come from its precomputed table, looked up on the host)."""
  from elastic_jax import data, evaluation
  from elastic_jax import export as export_lib
  from elastic_jax.cost import arch_cost, dense_arch
  from elastic_jax.scone.config import scone_config
  from elastic_jax.workdir import check_exists, check_seq_len
  if FLAGS.model:
    if FLAGS.arch or FLAGS.workdir:
      raise UserError('--model evaluates an exported model: leave out --workdir and --arch')
    dense, saved = export_lib.load(FLAGS.model)
    loaded = _loaded_config()
    data_cfg = loaded.data if loaded else export_lib.saved_data_config(FLAGS.model, saved)
    check_seq_len(dense.cfg, data_cfg.seq_len)
    data.check_lm_task(data_cfg)
    batches = data.eval_batches(data_cfg)
    from elastic_jax.scone.table import load_for_export
    table = load_for_export(FLAGS.model, dense, saved)
    if table is not None:  # a SCONE sub-network: its f-gram rows, looked up on the host
      batches = [table(b) for b in batches]
    result = evaluation.evaluate(dense, batches)
    if table is not None:
      result['scone_table_mb'] = table.nbytes / 1e6
    cost = arch_cost(dense.cfg, dense_arch(dense.dims),
                     bottleneck_head_dim=dense.dims.bottleneck_head_dim, seq_len=data_cfg.seq_len)
  else:
    check_exists(FLAGS.workdir)
    cfg = _config()
    data.check_lm_task(cfg.data)
    space, model, arch, step = _supernet_and_arch(cfg)
    batches = data.eval_batches(cfg.data)
    scfg = scone_config(cfg.get('scone'))
    if scfg is not None:
      from elastic_jax.scone import job as scone_job
      table = scone_job.inference_table(model, scfg, cfg.data, FLAGS.workdir, arch)
      batches = [table(b) for b in batches]
    result = evaluation.evaluate(model, batches, arch)
    result['step'] = step  # the checkpoint's training step (null: the seeded initialisation)
    cost = space.cost(arch)
    if scfg is not None:  # the sub-network's own rows: its f-gram count x its hidden width
      rows = min(table.n_used or len(table.fgrams), len(table.fgrams))
      result['scone_table_mb'] = 4e-6 * rows * int(arch.hidden)
  result.update(params=int(cost['params']), flops_per_token=float(cost['flops_per_token']))
  _print_json(result)


def _join_processes(cfg) -> bool:
  """Joins the other processes of a multi-process run (config section `distributed`, JAX_*
  variables, or a detected TPU pod; see elastic_jax/distributed.py) before any device is used,
  and stops every process with one line if they were given different configs. True on process 0,
  the one that prints."""
  from elastic_jax import distributed
  info = distributed.initialize(cfg)
  distributed.check_same_config(cfg, workdir=_flag('workdir'), pick=_flag('pick'),
                                out=_flag('out'))
  return info.is_main


_TRAIN_SECTIONS = ('seed', 'model', 'space', 'data', 'train', 'mesh', 'distributed',
                   'scone')


@command(flags=('workdir',), sections=_TRAIN_SECTIONS)
def train():
  """Trains the supernet of --config in --workdir (resumes from the workdir's checkpoints)."""
  from elastic_jax.train.trainer import train as train_job
  workdir = _require('workdir')
  cfg = _config(continuing=True)
  is_main = _join_processes(cfg)
  result = train_job(cfg, workdir)
  if is_main:
    _print_json(result)


@command(flags=('topology', 'programs', 'flops'), sections=_TRAIN_SECTIONS + ('search',))
def compile_():
  """Compiles training and population evaluation for a TPU --topology: memory, FLOPs, MFU."""
  from elastic_jax import aot
  cfg = _config()
  programs = aot.PROGRAMS
  if FLAGS.programs is not None:
    programs = tuple(p.strip() for p in FLAGS.programs.split(',') if p.strip())
  report = aot.compile_report(cfg, _require('topology'), programs=programs, flops=FLAGS.flops)
  print(aot.format_report(report), file=sys.stderr)
  _print_json(report)
  aot.check_fits(report)  # exit 2 with one line if a program does not fit in HBM


@command(flags=('workdir', 'arch', 'n', 'seed', 'max_params'),
         sections=('seed', 'model', 'space', 'data', 'proxy'))
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


@command(flags=('workdir', 'pick', 'out', 'overwrite'),
         sections=_TRAIN_SECTIONS + ('search', 'proxy'))
def run():
  """The whole job in --workdir: train -> search -> export (--pick, else search.export_pick)."""
  from elastic_jax import export as export_lib
  from elastic_jax.search.config import search_config
  from elastic_jax.search.job import check_layout, run_search
  from elastic_jax.search.pick import export_pick, parse_pick
  from elastic_jax.train.trainer import train as train_job
  workdir = _require('workdir')
  cfg = _config(continuing=True)
  pick = FLAGS.pick or search_config(cfg).export_pick
  parse_pick(pick)  # a bad --pick fails now, not after training and search
  if FLAGS.out:
    export_lib.check_out(FLAGS.out, FLAGS.overwrite)
  is_main = _join_processes(cfg)
  check_layout(cfg)  # the search's mesh and memory plan, before training
  seconds = {}
  t = time.perf_counter()
  trained = train_job(cfg, workdir)
  seconds['train'] = time.perf_counter() - t
  if not is_main:
    # Every process takes part in the search's evaluations (one search state, the mesh spans
    # every process); process 0 writes its files, exports and prints.
    run_search(cfg, workdir, log=lambda _: None)
    return
  print(f"trained to step {trained['step']} in {seconds['train']:.0f} s", file=sys.stderr)
  t = time.perf_counter()
  result = run_search(cfg, workdir)
  seconds['search'] = time.perf_counter() - t
  t = time.perf_counter()
  # The run's own export folder (W/export/front_<i>) is replaced when the job is run again.
  exported = export_pick(cfg, workdir, pick, out=FLAGS.out,
                         overwrite=FLAGS.overwrite or not FLAGS.out)
  seconds['export'] = time.perf_counter() - t
  _print_front(result)
  print(f"exported front member {exported['index']} ({pick}, {exported['params']:,} "
        f"parameters): {exported['out']}")
  print('time per phase: ' + ', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())
        + f' (total {sum(seconds.values()):.1f} s)')


@command(flags=('model', 'gguf', 'out'),
         sections=('hf', 'space', 'data', 'train', 'search'), name='import-hf')
def import_hf():
  """A Hugging Face checkpoint (--model DIR or --gguf FILE) becomes workdir --out."""
  from elastic_jax.hf.importer import import_workdir
  report = import_workdir(FLAGS.model, _require('out'), user_cfg=_loaded_config(),
                          gguf=FLAGS.gguf, log=lambda m: print(m, file=sys.stderr))
  _print_json({k: report[k] for k in ('source', 'model_type', 'params', 'initialised',
                                      'not_imported', 'seconds')} | {'workdir': FLAGS.out})


@command(flags=('model', 'prompt', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed'),
         sections=())
def generate():
  """Continues --prompt with the decoder --model (an export or a Hugging Face directory)."""
  from elastic_jax import export as export_lib
  from elastic_jax import generate as gen
  from elastic_jax.data.tokenizer import tokenizer_from_file
  model, tokenizer_path = export_lib.load_any(_require('model'))
  if tokenizer_path is None:
    raise UserError(f'--model {FLAGS.model} has no tokenizer.json; export the model with its '
                    'tokenizer (`elastic-jax export` writes one)')
  tokenizer = tokenizer_from_file(tokenizer_path)
  prompt = tokenizer.encode(_require('prompt'))
  sampling = gen.Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  from elastic_jax.scone.table import load_for_export
  table = load_for_export(FLAGS.model, model)  # a SCONE sub-network's f-gram table, or None
  result = gen.Generator(model, table).generate([prompt], FLAGS.max_new_tokens,
                                                sampling=sampling, seed=FLAGS.seed,
                                                eos_id=tokenizer.eos_id)
  print(FLAGS.prompt + tokenizer.decode(result.tokens[0]))
  print(json.dumps(result.summary()), file=sys.stderr)


@command(flags=('model', 'task', 'suite', 'workdir', 'out'), sections=('finetune',))
def finetune():
  """Fine-tunes --model on --task (GLUE, squad, squad_v2; or --suite glue-small) in --workdir
  (resumes it);
  --out: also write the best epoch as a transformers sequence classifier (BERT)."""
  from elastic_jax.finetune import trainer
  loaded = _loaded_config()
  cfg = trainer.default_config()
  if loaded is not None and 'finetune' in loaded:
    cfg.update(loaded.finetune)
  if not cfg.glue_dir:
    default = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'glue'
    cfg.glue_dir = str(default) if default.is_dir() else ''
  model, workdir = _require('model'), _require('workdir')
  log = lambda m: print(m, file=sys.stderr)
  if FLAGS.suite:
    if FLAGS.task:
      raise UserError('pass either --task or --suite, not both')
    scores = trainer.run_suite(model, FLAGS.suite, workdir, cfg, log=log)
    print((Path(workdir) / f'{FLAGS.suite}.md').read_text())
    _print_json(scores)
    return
  task = _require('task')
  job = trainer.job_for(task)
  if FLAGS.out:  # what the export would refuse, before the fine-tuning rather than after it
    from elastic_jax.finetune.export_hf import check_before_finetuning
    if not hasattr(job, 'task'):
      raise UserError(f'--out exports GLUE classifiers; {job.name} has no transformers export '
                      'here (its checkpoint is in --workdir)')
    check_before_finetuning(model, cfg, job.task.is_pair, FLAGS.out)
  result = trainer.finetune(model, task, workdir, cfg, log=log)
  out = {'task': result['task'], 'best': result['best']}
  if FLAGS.out:  # the best epoch as a transformers AutoModelForSequenceClassification directory
    from elastic_jax.finetune.export_hf import save_classifier
    clf, job, _ = trainer.load_best(workdir)
    config = json.loads((Path(model) / 'config.json').read_text())
    base = config if 'model_type' in config else None  # a Hugging Face --model: keep its ids
    out['exported'] = save_classifier(clf, job.task, FLAGS.out, tokenizer_dir=model, base=base)
  _print_json(out)


@command(flags=('workdir',), sections=('data',))
@command(flags=('workdir',), sections=('compress', 'data'))
def sort():
  """Sorts the imported model of --workdir by importance (W/sort/: scores, permutations)."""
  from elastic_jax.compress.sort import run_sort
  report = run_sort(_config(), _require('workdir'), log=lambda m: print(m, file=sys.stderr))
  _print_json({k: report[k] for k in ('method', 'layer_method', 'tokens', 'layer_order')})


@command(flags=('model', 'gguf', 'workdir', 'budgets'),
         sections=('compress', 'hf', 'data', 'train', 'search'))
def compress():
  """Compresses --model (or --gguf) in --workdir: import, sort, fine-tune, search, export
  under --budgets, pruning baselines, W/compress/summary.md (resumable)."""
  from elastic_jax.compress.job import run_compress
  summary = run_compress(FLAGS.model, _require('workdir'), budgets=FLAGS.budgets,
                         user_cfg=_loaded_config(), gguf=FLAGS.gguf)
  _print_json({k: summary[k] for k in ('hv_search', 'hv_pruning')}
              | {'summary': str(Path(FLAGS.workdir) / 'compress' / 'summary.md')})


@command(flags=('workdir',), sections=('data',))
def data_():
  """Builds (or finds cached) the config's dataset and tokenizer; prints their statistics."""
  from elastic_jax import data
  _print_json(data.describe(_config().data))


# -- flag parsing ----------------------------------------------------------------------------


def _quiet_closed_loop_callbacks() -> None:
  """After a failed checkpoint read (already reported in one line, or the training run's warning),
  Orbax's other array reads finish on threads: they call back into its closed event loop, and
  their coroutines, never awaited, are collected holding their own read errors. Python printed
  each with its traceback (up to 385 lines after one readable error). Those alone are dropped;
  every other unraisable exception is printed as before."""
  previous = sys.unraisablehook
  if getattr(previous, 'elastic_jax', False):
    return  # installed by an earlier call of main() in this process

  def orbax_leftover(unraisable) -> bool:
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == 'Event loop is closed'):
      return True
    code = getattr(unraisable.object, 'cr_code', None)  # a coroutine's
    return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename

  def hook(unraisable):
    if not orbax_leftover(unraisable):
      previous(unraisable)

  hook.elastic_jax = True
  sys.unraisablehook = hook
  # ... and asyncio logs the reads' tasks and futures it collects with their errors unread.
  import logging  # noqa: PLC0415
  logging.getLogger('asyncio').addFilter(
      lambda record: 'exception was never retrieved' not in str(record.msg))
  # ... and Python warns of each such coroutine collected before it started ("coroutine
  # 'Store._get_array_metadatas' was never awaited" after the error line, seen on a busy host).
  # The project runs no coroutine of its own: such a warning is a library's abandoned read.
  warnings.filterwarnings('ignore', message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)
  # ... and Orbax logs a garbled checkpoint metadata file as an error of its own before the read
  # fails (the error or warning that names the checkpoint says why).
  logging.getLogger('absl').addFilter(
      lambda record: not str(record.msg).startswith('Failed to json parse Metadata file'))


def main(argv: list[str] | None = None) -> int:
  global FLAGS, _RUNNING
  _quiet_closed_loop_callbacks()
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print(usage())
    return 0
  if argv[1] == '--version':
    print(f'elastic-jax {__version__}')
    return 0
  name = argv[1]
  if name not in COMMANDS:
    close = difflib.get_close_matches(name, list(COMMANDS), n=1)
    hint = f' (did you mean {close[0]}?)' if close else ''
    print(f'elastic-jax: unknown command {name!r}{hint}\n{usage()}', file=sys.stderr)
    return 2
  cmd, _RUNNING = COMMANDS[name], name
  args = argv[2:]
  wants_help = any(a in ('-h', '--help', '--helpfull', '-help') for a in args)
  if wants_help:
    args = [a for a in args if a not in ('-h', '--help', '--helpfull', '-help')]
  try:
    FLAGS = parse(cmd, args)
    if wants_help:
      print(command_help(cmd, _loaded_config()))
      return 0
    workdir = _flag('workdir')
    if workdir and Path(workdir).exists() and not Path(workdir).is_dir():
      raise UserError(f'--workdir {workdir} is a file, not a directory; pass a directory (a '
                      'missing one is created)')
    _use_compilation_cache()
    _release_memory_after_long_compiles()
    cmd.fn()
  except UserError as e:
    if wants_help:  # help without the config's values
      print(command_help(cmd))
      return 0
    print(f'elastic-jax {name}: error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # the file system refused (permissions, a file where a folder goes, full)
    where = f': {e.filename}' if e.filename else ''
    print(f'elastic-jax {name}: error: {e.strerror or e}{where}; check that path and its '
          'permissions', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
