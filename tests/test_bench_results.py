"""Every committed benchmark result says where it comes from: the git commit, whether the tree
had uncommitted changes, the machine and the command line (or, for files older than that
record, the commit that last changed them, marked as backfilled from git history)."""

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

RESULT_FILES = sorted((REPO / 'bench' / 'results').glob('*.json'))


def test_there_are_results():
  assert RESULT_FILES


@pytest.mark.parametrize('path', RESULT_FILES, ids=lambda p: p.name)
def test_every_results_file_records_its_commit_and_machine(path):
  results = json.loads(path.read_text())
  assert re.fullmatch(r'[0-9a-f]{40}', str(results.get('commit'))), f'{path.name}: no commit'
  assert isinstance(results.get('machine'), dict) and results['machine'].get('platform')
  if 'provenance' in results:
    assert results['provenance'].startswith('backfilled from git history')
  else:
    assert isinstance(results.get('dirty'), bool), f'{path.name}: no dirty flag'
    assert isinstance(results.get('command'), str) and results['command'].startswith('python ')


def test_write_results_records_commit_dirty_flag_and_command(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(REPO / 'bench'))
  import common
  monkeypatch.setattr(common, 'RESULTS', tmp_path)
  monkeypatch.setattr(sys, 'argv', ['bench/bench_x.py', '--quick', '--name=a b'])
  path = common.write_results('bench_x', {'value': 1.5}, [('a', 1)], ('name', 'value'),
                              quick=True)
  results = json.loads(path.read_text())
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True)
  if head.returncode != 0:
    pytest.skip('not a git clone (no commit to record)')
  status = subprocess.run(['git', 'status', '--porcelain', '--', '.', ':!bench/results'],
                          cwd=REPO, capture_output=True, text=True).stdout
  assert results['commit'] == head.stdout.strip()
  assert results['dirty'] is bool(status.strip())
  assert results['command'] == "python bench/bench_x.py --quick '--name=a b'"
  assert results['value'] == 1.5 and results['quick'] is True and 'platform' in results['machine']
  assert results['commit'] in (tmp_path / 'bench_x_quick.md').read_text()
