"""The `elastic-jax` command line's machinery: which flags each command takes, `--help`, and
turning every parsing mistake (an unknown flag, a config field that does not exist, a config file
that raises) into one line. The commands themselves are in `elastic_jax/cli.py`.

A new command with flags of its own: add the flags to `FLAG_DEFS`, then
`@command(flags=(...), sections=(...), name='import-hf')` above its function in cli.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from elastic_jax.errors import UserError

# Every flag a command may take: name -> (kind, default, help).
FLAG_DEFS = {
    'workdir': ('string', None, 'Working directory of the run.'),
    'arch': ('string', None, "Architecture JSON file (from `sample`, `export`, pareto.json), or "
             "'largest' / 'smallest'."),
    'format': ('string', 'native', 'export: native (config.json + model.safetensors) or hf (a '
               'directory transformers loads).'),
    'gguf': ('string', None, 'import-hf: a GGUF file to dequantise and import (hf extra).'),
    'prompt': ('string', None, 'generate: the text to continue.'),
    'max_new_tokens': ('integer', 64, 'generate: tokens to add.'),
    'temperature': ('float', 0.0, 'generate: sampling temperature (0 = greedy).'),
    'top_k': ('integer', 0, 'generate: sample among the k likeliest (0 = all).'),
    'top_p': ('float', 1.0, 'generate: nucleus sampling mass (1 = all).'),
    'task': ('string', None, 'finetune: GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, '
             'wnli), or squad / squad_v2 (extractive QA).'),
    'budgets': ('string', None, 'compress: params=0.3,0.5,0.7 (fractions of the original or '
                'counts).'),
    'suite': ('string', None, 'finetune: a task suite instead of --task (glue-small).'),
    'out': ('string', None, 'Output directory (must be new, or an earlier export with '
            '--overwrite).'),
    'overwrite': ('bool', False, 'Replace an earlier export at --out.'),
    'model': ('string', None, 'Directory of an exported dense model (import-hf, finetune, '
              'generate: also a Hugging Face model directory).'),
    'n': ('integer', 1, 'Number of architectures.'),
    'seed': ('integer', 0, 'Random seed.'),
    'max_params': ('integer', None, 'Parameter budget for sampling.'),
    'pick': ('string', None, 'Front member to export: index:N | knee | best-under:params=N '
             '(see elastic_jax/search/pick.py).'),
    'topology': ('string', None, 'TPU slice to compile for: CHIP:AxB (v5e, v6e) or CHIP:AxBxC '
                 '(v4, v5p), e.g. v5e:4x4.'),
    'programs': ('string', None, 'compile: the programs to compile, comma-separated '
                 '(train_step, population_eval, dense_step; default: all three).'),
    'flops': ('string', 'loops', "compile: FLOP counting: loops (XLA's counts times the loops' "
              'trip counts; scanned layers counted on an unrolled twin), unrolled (exact; large '
              'models need tens of GB), none (memory and fit only: the quickest check).'),
}

# Where each config section's fields are listed, every field commented.
SECTION_DOCS = {
    'seed': 'the top-level seed of the experiment config',
    'model': 'elastic_jax/config.py (ModelConfig)',
    'space': 'elastic_jax/config.py (SpaceConfig)',
    'data': 'elastic_jax/data/config.py',
    'train': 'elastic_jax/train/config.py',
    'mesh': 'elastic_jax/train/config.py (default_mesh)',
    'search': 'elastic_jax/search/config.py (default_config)',
    'proxy': 'elastic_jax/proxies/config.py',
    'distributed': 'elastic_jax/distributed.py',
    'hf': 'elastic_jax/hf/space.py (default_config: the imported space as fractions)',
    'finetune': 'elastic_jax/finetune/trainer.py (default_config)',
    'compress': 'elastic_jax/compress/config.py',
    'scone': 'elastic_jax/scone/config.py (SCONE f-gram embeddings)',
}


@dataclasses.dataclass(frozen=True)
class Command:
  name: str
  fn: Callable[[], None]
  flags: tuple[str, ...]  # besides --config
  sections: tuple[str, ...]  # the config sections it reads (for --help)


COMMANDS: dict[str, Command] = {}


def command(*, flags: tuple[str, ...] = ('workdir',), sections=('seed', 'model', 'space'),
            name: str | None = None):
  def register(fn):
    cmd_name = name or fn.__name__.rstrip('_')
    unknown = set(flags) - set(FLAG_DEFS)
    assert not unknown, f'{cmd_name}: undefined flags {unknown}'
    COMMANDS[cmd_name] = Command(cmd_name, fn, tuple(flags), tuple(sections))
    return fn
  return register


def make_flags(names) -> flags.FlagValues:
  """Fresh flags for each invocation (config override flags depend on the config loaded)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Experiment config file, configs/X.py[:arg].',
                                  flag_values=fv, lock_config=False)
  define = {'string': flags.DEFINE_string, 'integer': flags.DEFINE_integer,
            'float': flags.DEFINE_float, 'bool': flags.DEFINE_bool}
  for name in names:
    kind, default, help_text = FLAG_DEFS[name]
    define[kind](name, default, help_text, flag_values=fv)
  return fv


def usage() -> str:
  return ('usage: elastic-jax COMMAND --config=configs/X.py[:arg] [--config.a.b=v] [flags]\n'
          '       elastic-jax COMMAND --help\n       elastic-jax --version\n\ncommands:\n'
          + '\n'.join(f'  {c.name:10s} {c.fn.__doc__.splitlines()[0]}'
                      for c in COMMANDS.values()))


def command_help(cmd: Command, cfg=None) -> str:
  """`elastic-jax CMD --help`: what it does, its flags, and the config fields it reads (with
  their values when --config was given too)."""
  lines = [f'usage: elastic-jax {cmd.name} [--config=configs/X.py[:arg]] [--config.a.b=v ...] '
           + ' '.join(f'[--{f}]' for f in cmd.flags), '', cmd.fn.__doc__.strip(), '', 'flags:',
           '  --config=configs/X.py[:arg]  the experiment config'
           + (" (a workdir's config.json when left out)" if 'workdir' in cmd.flags else '')]
  for name in cmd.flags:
    kind, default, help_text = FLAG_DEFS[name]
    value = {'string': '=S', 'integer': '=N', 'float': '=X', 'bool': ''}[kind]
    lines.append(f'  --{name}{value}  {help_text}'
                 + (f' (default {default})' if default not in (None, False) else ''))
  lines += ['', 'config fields it reads (override any with --config.SECTION.FIELD=VALUE after '
            '--config; every field is commented in):']
  lines += [f'  {s}: {SECTION_DOCS[s]}' for s in cmd.sections]
  if cfg is None:
    lines.append(f'`elastic-jax {cmd.name} --config=configs/X.py --help` lists their values.')
  else:
    lines += ['', 'their values in this config:']
    for section in cmd.sections:
      if section not in cfg:
        continue
      value = cfg[section]
      if hasattr(value, 'to_dict'):
        for key, v in _flat_items(value.to_dict(), f'{section}.'):
          lines.append(f'  --config.{key}={v!r}')
      else:
        lines.append(f'  --config.{section}={value!r}')
  return '\n'.join(lines)


def _flat_items(tree, prefix):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat_items(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def _innermost(e: BaseException) -> BaseException:
  """The original error behind config_flags' wrappers (e.g. the config file's own ValueError)."""
  seen = e
  while (seen.__cause__ or seen.__context__) is not None:
    seen = seen.__cause__ or seen.__context__
  return seen


# What a flag's parser says -> what the value should have been.
_EXPECTED = (('for int()', 'a whole number'), ('to float', 'a number'),
             ('Non-boolean', 'true or false'))


def _bad_value_error(e: BaseException) -> str | None:
  """One line for a value a flag or a config field cannot take (`--max_new_tokens=abc`,
  `--config.train.steps=1.5`), naming it and its type; None for other errors (--config's own)."""
  m = re.match(r'flag --([\w.]+)=(.*?): (.*)', str(e).splitlines()[0] if str(e) else '')
  if not isinstance(e, flags.Error) or not m or m.group(1) == 'config':
    return None
  name, value, reason = m.groups()
  expected = next((want for said, want in _EXPECTED if said in reason), None)
  field = f'config field {name[len("config."):]}' if name.startswith('config.') else f'--{name}'
  return (f'{field}={value!r} is invalid: it must be {expected}' if expected else
          f'{field}={value!r} is invalid: {reason}')


def _override_error(e: BaseException, args: list[str]) -> str:
  """One line for an override naming a field the config does not have."""
  text = str(e).replace('\\n', '\n').replace('\\', '')
  keys = re.findall(r"'(\w+)'", text)
  key = keys[0] if keys else ''
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  culprit = next((a for a in args if a.startswith('--config.')
                  and re.search(rf'\.{re.escape(key)}(\.|=|$)', a.split('=')[0] + '=')), None)
  where = culprit or '--config override'
  hint = f" (did you mean '{suggestion.group(1)}'?)" if suggestion else ''
  return f'{where}: the config has no field {key!r}{hint}'


def _join_config_value(args: list[str]) -> list[str]:
  """'--config X' -> '--config=X', so that --config can be moved before its overrides."""
  out, i = [], 0
  while i < len(args):
    if args[i] == '--config' and i + 1 < len(args):
      out.append(f'--config={args[i + 1]}')
      i += 2
    else:
      out.append(args[i])
      i += 1
  return out


def parse(cmd: Command, args: list[str]) -> flags.FlagValues:
  """Parses `args` into fresh flags for `cmd` (loading --config); UserError with one line for
  anything wrong."""
  fv = make_flags(cmd.flags)
  overrides = [a for a in args if a.startswith('--config.')]
  args = _join_config_value(args)
  config_args = [a for a in args if a.startswith('--config=')]
  if overrides and not config_args:
    raise UserError(f'{overrides[0]} overrides a field of --config, but no --config was given: '
                    'add --config=configs/X.py (before the overrides); a workdir\'s config.json '
                    'cannot be overridden')
  # config_flags wants --config before its overrides: move it first.
  if config_args:
    args = config_args + [a for a in args if a not in config_args]
  for a in args:
    name = a[2:].split('=')[0] if a.startswith('--') else ''
    if name.startswith('no'):
      name = name[2:] if name[2:] in cmd.flags else name
    if name and name != 'config' and not name.startswith('config.') and name not in cmd.flags:
      close = difflib.get_close_matches(name, list(cmd.flags) + ['config'], n=1)
      hint = f' (did you mean --{close[0]}?)' if close else ''
      raise UserError(f'`elastic-jax {cmd.name}` takes no flag --{name}{hint}; its flags: '
                      + ', '.join(f'--{f}' for f in ('config',) + cmd.flags))
  flag_argv = ['elastic-jax'] + args
  saved_argv, sys.argv = sys.argv, flag_argv  # config_flags reads overrides from sys.argv
  try:
    positional = fv(flag_argv)[1:]
    if positional:
      raise UserError(f'unexpected argument {positional[0]!r}: `elastic-jax {cmd.name}` takes '
                      'only flags (--name=value)')
    loaded_config(fv)
  except (AttributeError, KeyError) as e:
    raise UserError(_override_error(e, overrides)) from None
  except (flags.Error, OSError, ValueError, TypeError) as e:
    if isinstance(e, UserError):
      raise
    bad_value = _bad_value_error(e)
    if bad_value:
      raise UserError(bad_value) from None
    inner = _innermost(e)
    if inner is not e and not isinstance(inner, OSError):  # the config file's own reason
      first = [l for l in str(inner).splitlines() if l.strip()] or [type(inner).__name__]
      raise UserError(f'--config: {first[-1].strip()}') from None
    lines = [l for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    raise UserError(lines[0]) from None
  finally:
    sys.argv = saved_argv
  return fv


def loaded_config(fv: flags.FlagValues):
  """--config, loaded (config_flags loads lazily, so a missing or failing file surfaces here)."""
  try:
    cfg = fv.config
    if cfg is not None:
      cfg.keys()  # a config that failed to load raises on first use
    return cfg
  except OSError as e:
    reason = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    raise UserError(f'could not load --config: {reason}') from None
