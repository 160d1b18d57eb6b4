"""Every command block of the README runs as written (issue 20, item 4), so the README cannot drift.

Each ```bash block is one scenario in a fresh temporary folder: its placeholders (W, W2, DIR,
arch.json, the /tmp workdirs) become paths there, `[--flag]` options are kept, and small settings
are appended as overrides to every command that names a --config (later flags win), so the block
runs in seconds instead of minutes. Only commands that need what this machine may lack (the `tpu`
extra, the shared tinyshakespeare file) are skipped, with the reason. The Hugging Face examples
(```sh blocks: real checkpoints, minutes of CPU each, Python snippets) are not run here; the same
commands run in tests/hf/test_hf_cli.py on tiny checkpoints and, with SmolLM2 and MiniLM, in
tests/hf/test_hf_real_checkpoints.py.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, load_config

from elastic_jax import cli

README = REPO / 'README.md'

# Small settings, applied where the config has the field. Training: 2 steps; search: a population
# of 4 for one generation; one validation batch; one proxy batch.
SMALL = {
    'train.steps': '2', 'train.log_every': '1', 'train.checkpoint_every': '2',
    'train.eval_every': '0', 'train.warmup_steps': '1',
    'data.seq_len': '32', 'data.batch_size': '4', 'data.eval_batches': '1',
    'search.pop_size': '4', 'search.generations': '1', 'search.latency_max': '2',
    'search.latency_repeats': '1', 'proxy.num_batches': '1',
}
# Flags whose README value is large; the test's value wins (absl takes the last one).
SMALL_FLAGS = {'proxy': ['--n=1']}
# `compile` lowers for a 16-chip slice (the batch must split over it): a 2-layer model instead of
# GPT-2 medium, whose compile takes minutes.
SMALL_COMPILE = {
    'space.num_layers': '2', 'space.depth': '(1, 2)', 'space.hidden': '(64,)',
    'space.heads': '(2,)', 'space.head_dim': '(32,)', 'space.ffn': '(128,)',
    'model.vocab_size': '1024', 'model.max_len': '64', 'data.seq_len': '32',
    'data.eval_batches': '1', 'train.steps': '2',
}


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
  """(line number, commands) of each ```bash block: continuations joined, comments dropped."""
  blocks = []
  for m in re.finditer(r'^```bash\n(.*?)^```', text, re.M | re.S):
    line_no = text[:m.start()].count('\n') + 1
    joined = m.group(1).replace('\\\n', ' ')
    commands = []
    for line in joined.splitlines():
      line = re.split(r'\s+#\s', ' ' + line, maxsplit=1)[0].strip()
      if line:
        commands.append(line)
    blocks.append((line_no, commands))
  return blocks


BLOCKS = bash_blocks(README.read_text())
TEST_COMMAND = '.venv/bin/python -m pytest -q -rs -n 2 --dist loadfile'


def test_the_readme_has_the_blocks_this_test_knows():
  """A new block must run here too: every command is an install, the test command or
  `elastic-jax`."""
  assert len(BLOCKS) >= 5
  for _, commands in BLOCKS:
    for command in commands:
      steps = [s.strip() for s in command.split('&&')]
      last = steps[-1]
      assert (last.startswith(('elastic-jax ', '.venv/bin/elastic-jax '))
              or last == TEST_COMMAND), command


def _substitute(arg: str, tmp: Path) -> str:
  """README placeholders -> paths in this scenario's folder."""
  def repl(word: str) -> str:
    if word in ('W', 'W2', 'DIR', 'arch.json', 'archs.jsonl'):
      return str(tmp / word)
    if word.startswith(('W/', 'DIR/', 'W2/')):
      return str(tmp / word)
    if word.startswith('/tmp/'):
      return str(tmp / word[len('/tmp/'):])
    return word
  if arg.startswith('--') and '=' in arg:
    name, value = arg.split('=', 1)
    return f'{name}={repl(value)}'
  return repl(arg)


def _config_of(args: list[str]):
  spec = next((a.split('=', 1)[1] for a in args if a.startswith('--config=')), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(':')
  return load_config(Path(path).stem, arg or None)


def _has(cfg, dotted: str) -> bool:
  node = cfg
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return False
    node = node[part]
  return True


def _skip_reason(args: list[str]) -> str | None:
  if args[0] == 'compile' and importlib.util.find_spec('libtpu') is None:
    return '`elastic-jax compile` needs the tpu extra (libtpu): pip install -e .[tpu]'
  if any('shakespeare' in a for a in args) and not (SHARED_DATA / 'tinyshakespeare').is_dir():
    return f'the tinyshakespeare file is absent ({SHARED_DATA}/tinyshakespeare)'
  return None


def _elastic_jax(argv: list[str], tmp: Path, cache: Path) -> tuple[list[str], str | None]:
  """The argv to run (README placeholders substituted, small settings appended) and the file
  its stdout is redirected to."""
  out_file = None
  if '>' in argv:
    i = argv.index('>')
    out_file, argv = argv[i + 1], argv[:i]
  argv = [a[1:-1] if a.startswith('[') and a.endswith(']') else a for a in argv]
  argv = [_substitute(a, tmp) for a in argv]
  cfg = _config_of(argv)
  if cfg is not None:
    small = SMALL_COMPILE if argv[0] == 'compile' else SMALL
    argv += [f'--config.{k}={v}' for k, v in small.items() if _has(cfg, k)]
    argv.append(f'--config.data.cache_dir={cache}')
  argv += SMALL_FLAGS.get(argv[0], [])
  return argv, (_substitute(out_file, tmp) if out_file else None)


def _install_extras(step: str) -> list[str]:
  m = re.search(r"pip install -e '?\.(\[([\w,]+)\])?'?", step)
  assert m, step
  return m.group(2).split(',') if m.group(2) else []


def _run_block(commands: list[str], tmp: Path, cache: Path, monkeypatch) -> list[str]:
  """Runs a block's commands in order; returns the skip reasons of the ones it could not run."""
  monkeypatch.chdir(REPO)  # README commands name configs/X.py from the repository root
  skipped = []
  extras = configparser.ConfigParser()
  extras.read(REPO / 'setup.cfg')
  for command in commands:
    steps = [s.strip() for s in command.split('&&')]
    for step in steps[:-1]:  # the install steps: what they name must exist
      if 'pip install --no-deps ' in step:  # a package installed without its dependencies
        assert step.split()[-1] in (REPO / '.ci' / 'run').read_text(), step
      elif 'pip install' in step:
        for extra in _install_extras(step):
          assert extra in extras['options.extras_require'], f'{command}: no extra {extra!r}'
      else:
        assert step == 'python3 -m venv .venv', command
    last = steps[-1]
    if last == TEST_COMMAND:
      # The test command itself (this test is part of it): it must be what CI runs.
      assert TEST_COMMAND.split('/bin/python')[-1] in (REPO / '.ci' / 'run').read_text()
      continue
    argv = shlex.split(last)
    assert argv[0] in ('elastic-jax', '.venv/bin/elastic-jax'), command
    argv, out_file = _elastic_jax(argv[1:], tmp, cache)
    reason = _skip_reason(argv)
    if reason:
      skipped.append(f'{last}: {reason}')
      continue
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      code = cli.main(['elastic-jax', *argv])
    assert code == 0, (f'README command failed (exit {code}): {last}\nran: elastic-jax '
                       f'{shlex.join(argv)}\n{stderr.getvalue()[-3000:]}')
    if out_file:
      Path(out_file).write_text(stdout.getvalue())
    if argv[0] == 'run':  # the README promises the time per phase
      assert 'time per phase: train' in stdout.getvalue(), stdout.getvalue()
  return skipped


@pytest.mark.slow
@pytest.mark.parametrize('line_no, commands', BLOCKS, ids=[f'line{n}' for n, _ in BLOCKS])
def test_readme_block_runs(line_no, commands, tmp_path, data_cache, monkeypatch, capsys):
  skipped = _run_block(commands, tmp_path, data_cache, monkeypatch)
  if skipped:
    pytest.skip('; '.join(skipped))
