"""The `elastic-jax` command contract: info, sample, export, evaluate, and one-line errors."""

import json
import os
import sys

import pytest
from conftest import REPO, load_config

from elastic_jax import cli

QUICK = f'--config={REPO}/configs/quickstart.py:tiny'


def run(capsys, *args):
  code = cli.main(['elastic-jax', *args])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture
def cache(data_cache):
  return f'--config.data.cache_dir={data_cache}'


def test_info_and_sample(capsys):
  code, out, _ = run(capsys, 'info', QUICK)
  assert code == 0
  info = json.loads(out)
  assert info['architectures'] > 1 and info['params_min'] < info['params_max']
  code, out, _ = run(capsys, 'sample', QUICK, '--n=5', '--seed=3')
  assert code == 0
  lines = out.strip().splitlines()
  assert len(lines) == 5 and all(json.loads(l)['layers'] for l in lines)
  code, again, _ = run(capsys, 'sample', QUICK, '--n=5', '--seed=3')
  assert again == out  # deterministic for a seed


def test_export_then_evaluate_gives_the_same_loss(capsys, cache, tmp_path):
  code, out, _ = run(capsys, 'sample', QUICK, '--n=1', '--seed=1')
  arch = tmp_path / 'arch.json'
  arch.write_text(out)
  code, out, err = run(capsys, 'export', QUICK, cache, f'--arch={arch}',
                       f'--out={tmp_path / "dense"}')
  assert code == 0, err
  assert (tmp_path / 'dense' / 'model.safetensors').is_file()
  assert (tmp_path / 'dense' / 'tokenizer.json').is_file()
  code, out, err = run(capsys, 'evaluate', QUICK, cache, f'--arch={arch}')
  assert code == 0, err
  masked = json.loads(out)
  code, out, err = run(capsys, 'evaluate', f'--model={tmp_path / "dense"}', QUICK, cache)
  assert code == 0, err
  dense = json.loads(out)
  assert dense['loss'] == pytest.approx(masked['loss'], rel=1e-5)
  # Without --config: the data config saved in the export, tokenized by the exported tokenizer.
  code, out, err = run(capsys, 'evaluate', f'--model={tmp_path / "dense"}')
  assert code == 0, err
  assert json.loads(out)['loss'] == pytest.approx(masked['loss'], rel=1e-5)
  assert dense['params'] == masked['params']
  assert dense['flops_per_token'] == pytest.approx(masked['flops_per_token'])


@pytest.mark.parametrize('arch_text, message', [
    ('{"hidden": 1000, "depth": 1, "head_dim": 8, "layers": []}', 'hidden=1000'),
    ('{not json', 'not valid JSON'),
])
def test_bad_arch_is_one_line_exit_2_no_output(capsys, cache, tmp_path, arch_text, message):
  arch = tmp_path / 'arch.json'
  arch.write_text(arch_text)
  out_dir = tmp_path / 'out'
  code, _, err = run(capsys, 'export', QUICK, cache, f'--arch={arch}', f'--out={out_dir}')
  assert code == 2
  assert message in err and len(err.strip().splitlines()) == 1
  assert not out_dir.exists()
  assert list(tmp_path.iterdir()) == [arch]


def test_heads_not_dividing_hidden_is_one_line_exit_2(capsys, tmp_path):
  code, _, err = run(capsys, 'info', QUICK, '--config.space.hidden=(30, 50)',
                     '--config.space.head_dim=()')
  assert code == 2
  assert 'does not divide the largest hidden size' in err
  assert len(err.strip().splitlines()) == 1


def test_missing_files_and_unknown_command(capsys, tmp_path):
  code, _, err = run(capsys, 'evaluate', f'--model={tmp_path / "none"}')
  assert code == 2 and 'config.json is missing' in err
  code, _, err = run(capsys, 'export', QUICK, f'--arch={tmp_path / "no.json"}', '--out=x')
  assert code == 2 and 'does not exist' in err
  code, _, err = run(capsys, 'frobnicate')
  assert code == 2 and 'unknown command' in err
  code, _, err = run(capsys, 'info', '--config=configs/nope.py')
  assert code == 2 and len(err.strip().splitlines()) == 1


def test_compile_without_config_asks_for_config_not_workdir(capsys, tmp_path, monkeypatch):
  """compile takes no --workdir: without --config it said to pass one, which it then refused."""
  monkeypatch.chdir(tmp_path)
  code, out, err = run(capsys, 'compile', '--topology=v5e:2x2')
  assert code == 2 and not out and err.splitlines() == [
      'elastic-jax compile: error: --config is required for `elastic-jax compile` (it takes no '
      '--workdir): pass --config=configs/X.py[:arg], the experiment config to use'], err
  code, out, _ = run(capsys, 'compile', '--help')
  assert code == 0 and "config.json when left out" not in out
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('override, message', [
    ('--config.search.budgets.params=-5',
     'search.budgets.params=-5 is invalid: a budget must be a positive number, an absolute upper '
     'bound in parameters (not a fraction), or 0 for no budget'),
    ('--config.search.objectives=()',
     'search.objectives is empty; name at least one objective, e.g. ("loss", "params"), from: '
     'params, flops, '),
])
def test_a_bad_search_setting_is_one_line_before_anything_runs(capsys, cache, tmp_path, override,
                                                               message):
  """A negative budget said 'below the smallest achievable value ...; raise the budget'; empty
  objectives printed 'every objective is zero-cost; scoring the seeded initialisation' first."""
  w = tmp_path / 'w'
  code, out, err = run(capsys, 'search', QUICK, cache, f'--workdir={w}', override,
                       '--config.search.allow_untrained=true')
  assert code == 2 and not out and len(err.splitlines()) == 1, err
  assert err.startswith(f'elastic-jax search: error: {message}'), err
  assert not w.exists()


def test_paths_the_file_system_refuses_are_one_line_exit_2(capsys, cache, tmp_path):
  """A --workdir that is a file, and an --out below a file, are one line each (they were
  FileExistsError / NotADirectoryError tracebacks), and nothing is written."""
  afile = tmp_path / 'afile'
  afile.write_text('x')
  for command in ('train', 'search', 'export'):
    code, _, err = run(capsys, command, QUICK, cache, f'--workdir={afile}',
                       *(['--arch=largest', '--out=o'] if command == 'export' else []))
    assert code == 2 and err.splitlines() == [
        f'elastic-jax {command}: error: --workdir {afile} is a file, not a directory; pass a '
        'directory (a missing one is created)'], err
  code, _, err = run(capsys, 'export', QUICK, cache, '--arch=largest',
                     f'--out={afile / "sub" / "m"}')
  assert code == 2 and len(err.splitlines()) == 1, err
  assert err.startswith('elastic-jax export: error: Not a directory') and str(afile) in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['afile'] and afile.read_text() == 'x'


def test_corrupt_exported_weights(capsys, cache, tmp_path):
  code, out, _ = run(capsys, 'sample', QUICK, '--n=1')
  (tmp_path / 'a.json').write_text(out)
  run(capsys, 'export', QUICK, cache, f'--arch={tmp_path / "a.json"}', f'--out={tmp_path / "m"}')
  weights = tmp_path / 'm' / 'model.safetensors'
  weights.write_bytes(weights.read_bytes()[:100])
  code, _, err = run(capsys, 'evaluate', f'--model={tmp_path / "m"}', QUICK, cache)
  assert code == 2 and 'corrupt or truncated' in err


@pytest.mark.parametrize('args, message', [
    (['generate', '--model=m', '--prompt=hi', '--max_new_tokens=abc'],
     "--max_new_tokens='abc' is invalid: it must be a whole number"),
    (['generate', '--model=m', '--prompt=hi', '--temperature=hot'],
     "--temperature='hot' is invalid: it must be a number"),
    (['train', QUICK, '--workdir=w', '--config.train.steps=1.5'],
     "config field train.steps='1.5' is invalid: it must be a whole number"),
    (['train', QUICK, '--workdir=w', '--config.model.scan_layers=maybe'],
     "config field model.scan_layers='maybe' is invalid: it must be true or false"),
])
def test_a_value_of_the_wrong_type_names_its_flag(capsys, tmp_path, monkeypatch, args, message):
  """They said '--config: invalid literal for int() ...', whatever the flag."""
  monkeypatch.chdir(tmp_path)
  code, out, err = run(capsys, *args)
  assert code == 2 and not out and err.strip() == f'elastic-jax {args[0]}: error: {message}'
  assert not list(tmp_path.iterdir())


def test_a_path_of_the_wrong_kind_says_what_to_pass(capsys, tmp_path):
  """A Hugging Face directory given to evaluate (it said: format None, expected ...), a missing
  one to import-hf (it asked for a tokenizer.json), a directory or a misspelt word as --arch."""
  hf = tmp_path / 'hf'
  hf.mkdir()
  (hf / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
  code, _, err = run(capsys, 'evaluate', f'--model={hf}')
  assert code == 2 and 'is a Hugging Face model directory' in err and 'import-hf' in err, err
  code, _, err = run(capsys, 'import-hf', f'--model={tmp_path / "none"}',
                     f'--out={tmp_path / "w"}')
  assert code == 2 and 'is not a directory' in err, err
  for arch, said in ((hf, 'is a directory'), ('biggest', 'does not exist')):
    code, _, err = run(capsys, 'export', QUICK, f'--arch={arch}', f'--out={tmp_path / "o"}')
    assert code == 2 and said in err and 'largest / smallest' in err, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hf']


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.pop('space'), "config.json has no 'space' section"),
    (lambda c: c.pop('model'), "config.json has no 'model' section"),
    (lambda c: c.pop('data'), "config.json has no 'data' section"),
    (lambda c: c['space'].pop('ffn'), 'config field space.ffn is missing'),
    (lambda c: c['space'].update(hidden='abc'), "space.hidden=['abc'] is invalid: choices must be "
                                                'whole numbers'),
    (lambda c: c['space'].update(hidden=[32, 4.5]), 'space.hidden=[32, 4.5] is invalid: choices '
                                                    'must be whole numbers'),
])
def test_a_damaged_workdir_config_is_one_line(capsys, cache, tmp_path, edit, message):
  """A workdir's config.json without a section or a required field, or with a choice that is
  not a whole number: one line (KeyError / AttributeError / ValueError tracebacks; 4.5 was read
  as 4)."""
  cfg = load_config('quickstart', 'tiny').to_dict()
  edit(cfg)
  w = tmp_path / 'w'
  w.mkdir()
  (w / 'config.json').write_text(json.dumps(cfg))
  for command in ('evaluate', 'export'):
    code, out, err = run(capsys, command, f'--workdir={w}', '--arch=largest',
                         *(['--out=' + str(tmp_path / 'o')] if command == 'export' else []))
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert message in err, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['w']


@pytest.mark.parametrize('name, arg', [('quickstart', None), ('quickstart', 'tiny'),
                                       ('bert_elm', None), ('bert_elm', 'tiny'),
                                       ('bert_elm', 'runlocal'), ('flexibert', None),
                                       ('flexibert', 'runlocal')])
def test_every_config_builds(name, arg):
  from flax import nnx

  from elastic_jax.workdir import build_space, init_supernet
  cfg = load_config(name, arg)
  space = build_space(cfg)
  model = nnx.eval_shape(lambda: init_supernet(cfg, space))
  assert model.dims == space.cfg.supernet_dims()
  assert space.describe()['architectures'] >= 1


@pytest.mark.parametrize('override, message', [
    ("--config.data.paths=('/no/such/corpus.txt',)", 'corpus.txt'),
    ('--config.data.source=tfds_typo', 'data.source'),
])
def test_bad_data_input_is_one_line_exit_2(capsys, cache, override, message):
  extra = ['--config.data.source=text_files'] if 'paths' in override else []
  code, _, err = run(capsys, 'data', QUICK, cache, *extra, override)
  assert code == 2, err
  assert message in err and len(err.strip().splitlines()) == 1


def test_compiled_programs_persist_between_commands(data_cache, tmp_path):
  """Without JAX_COMPILATION_CACHE_DIR a command keeps its compiled programs in
  $ELASTIC_JAX_CACHE/xla, and the same command run again compiles nothing new (every program is
  a cache hit, so no entry is added)."""
  import subprocess

  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env.update(ELASTIC_JAX_CACHE=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  command = [sys.executable, '-m', 'elastic_jax.cli', 'evaluate', QUICK, '--arch=largest',
             f'--config.data.cache_dir={data_cache}']
  entries = lambda: sorted(p.name for p in (tmp_path / 'xla').iterdir()
                           if not p.name.endswith('-atime'))
  first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr
  compiled = entries()
  assert compiled, 'nothing was cached'
  again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr
  assert json.loads(again.stdout) == json.loads(first.stdout)
  assert entries() == compiled


_FREED_AND_COMPILE = '''
import ctypes, sys
import jax, jax.numpy as jnp
from elastic_jax import cli
cli.RELEASE_AFTER_COMPILE_S = -1.0  # every compilation counts as long
if sys.argv[1] == 'release':
  cli._release_memory_after_long_compiles()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096
blocks = [libc.malloc(4000) for _ in range(100_000)]  # 400 MB of small blocks in the heap
for i in range(100_000):
  ctypes.memset(blocks[i], 1, 4000)
keep = libc.malloc(4000)  # a live block above them: free() alone cannot shrink the heap
for b in blocks:
  libc.free(b)
before = rss()
jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).block_until_ready()
print(before - rss())
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='malloc_trim is glibc (Linux)')
def test_memory_freed_before_a_long_compile_returns_to_the_system():
  """glibc keeps freed heap pages in the process; after a compilation longer than
  RELEASE_AFTER_COMPILE_S the CLI hands them back (the 400 MB freed here), and without its
  listener they stay."""
  import subprocess

  freed = {}
  for mode in ('release', 'keep'):
    out = subprocess.run([sys.executable, '-c', _FREED_AND_COMPILE, mode], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert out.returncode == 0, out.stderr
    freed[mode] = int(out.stdout.split()[-1])
  assert freed['release'] > 300e6, freed
  assert freed['keep'] < 100e6, freed
