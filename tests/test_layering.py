"""Dependencies point down: cli -> {train, search, proxies, ...} -> {model, data, losses,
checkpoints} -> {space, config}. Checked on every import statement (function-level ones too)."""

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / 'elastic_jax'

# module (path relative to elastic_jax/, a folder ends in /) -> packages it must not import.
FORBIDDEN = {
    'model/': ('train', 'search', 'data', 'proxies', 'evaluation', 'losses', 'checkpoints',
               'workdir', 'export'),
    'config.py': ('train', 'search', 'data', 'proxies', 'model'),
    'arch.py': ('train', 'search', 'data', 'proxies', 'model'),
    'space.py': ('train', 'search', 'data', 'proxies', 'model.supernet', 'model.layers'),
    'cost.py': ('train', 'search', 'data', 'proxies', 'model.supernet', 'model.layers'),
    'losses.py': ('train', 'search', 'data', 'proxies', 'model'),
    'accumulate.py': ('train', 'search', 'data', 'proxies', 'model'),
    'checkpoints.py': ('train', 'search', 'data', 'proxies', 'model'),
    'evaluation.py': ('train', 'search', 'data', 'proxies'),
    'export.py': ('train', 'search', 'data', 'proxies'),
    'workdir.py': ('train', 'search', 'proxies'),
    'proxies/': ('train', 'search'),
    'search/': ('train',),
    'data/': ('train', 'search', 'model', 'proxies'),
    'scone/': ('train', 'search', 'proxies'),
}


def imported_modules(path: Path) -> set[str]:
  """Every elastic_jax module `path` imports, as dotted names below elastic_jax."""
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from elastic_jax import train` imports elastic_jax.train.
      names |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
  return {n[len('elastic_jax.'):] for n in names if n.startswith('elastic_jax.')}


def modules():
  return sorted(p for p in PACKAGE.rglob('*.py'))


def test_libraries_never_import_the_cli():
  offenders = [str(p.relative_to(REPO)) for p in modules() if p.name != 'cli.py'
               and any(m == 'cli' or m.startswith('cli.') for m in imported_modules(p))]
  assert not offenders, offenders


@pytest.mark.parametrize('where', sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(where):
  paths = [p for p in modules() if str(p.relative_to(PACKAGE)).startswith(where)]
  assert paths, f'no module matches {where}'
  offenders = []
  for path in paths:
    for name in imported_modules(path):
      for bad in FORBIDDEN[where]:
        if name == bad or name.startswith(bad + '.'):
          offenders.append(f'{path.relative_to(REPO)} imports elastic_jax.{name}')
  assert not offenders, offenders


def test_the_checker_sees_function_level_imports(tmp_path):
  """The check can fail: an import inside a function is found."""
  module = tmp_path / 'm.py'
  module.write_text('def f():\n  from elastic_jax.train import step\n  import elastic_jax.cli\n')
  assert imported_modules(module) == {'train', 'train.step', 'cli'}
