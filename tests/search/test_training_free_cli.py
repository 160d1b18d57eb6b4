"""Training-free search from the command line: search with W-PCA on a workdir that was never
trained, export the best architecture found, train it alone (issue: zero-cost proxies, item 3)."""

import json

from conftest import REPO

from elastic_jax import cli

QUICK = f'--config={REPO}/configs/quickstart.py:tiny'


def run(capsys, *args):
  code = cli.main(['elastic-jax', *args])
  out, err = capsys.readouterr()
  return code, out, err


def test_search_with_wpca_then_export_then_train_the_found_arch(capsys, data_cache, tmp_path):
  common = [QUICK, f'--config.data.cache_dir={data_cache}', '--config.proxy.num_batches=2']
  work = tmp_path / 'w'
  code, out, err = run(capsys, 'search', *common, f'--workdir={work}',
                       '--config.search.fitness=wpca', '--config.search.budgets.params=70000',
                       '--config.search.pop_size=8', '--config.search.generations=3',
                       '--config.search.latency=False')
  assert code == 0, err
  assert 'no training needed' in err
  pareto = json.loads((work / 'search' / 'pareto.json').read_text())
  assert pareto['objectives'] == ['wpca'] and pareto['strategy'] == 'ga'
  best = pareto['front'][-1]
  assert best['metrics']['params'] <= 70000

  out_dir = tmp_path / 'best'
  code, out, err = run(capsys, 'export', *common, f'--workdir={work}', '--pick=index:-1',
                       f'--out={out_dir}')
  assert code == 0, err
  assert json.loads((out_dir / 'arch.json').read_text()) == best['arch']

  code, out, err = run(capsys, 'train', *common, f'--workdir={tmp_path / "t"}',
                       f'--config.train.arch={out_dir / "arch.json"}', '--config.train.steps=3',
                       '--config.train.checkpoint_every=3')
  assert code == 0, err
  assert any((tmp_path / 't' / 'checkpoints').iterdir())
