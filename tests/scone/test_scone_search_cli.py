"""A search over a SCONE space through the command line: the front trades host table MB for loss;
the picked member exports with its own table and evaluates from it."""

import json

import numpy as np
import pytest
from conftest import REPO

from elastic_jax import cli
from elastic_jax.search.hypervolume import pareto_front_mask

QUICK = f'--config={REPO}/configs/quickstart.py:tiny'


@pytest.mark.slow
def test_search_over_fgram_counts_trades_table_mb_for_loss(capsys, data_cache, tmp_path):
  w = tmp_path / 'w'
  flags = [QUICK, f'--workdir={w}', f'--config.data.cache_dir={data_cache}',
           '--config.scone.enabled=True', '--config.scone.num_fgrams=400',
           '--config.scone.width=8', '--config.scone.heads=2', '--config.scone.ffn=12',
           '--config.scone.layers=2', '--config.space.fgrams=(8, 50, 400)',
           '--config.space.fgram_layers=(1, 2)', '--config.train.steps=40']
  assert cli.main(['elastic-jax', 'train', *flags]) == 0
  capsys.readouterr()
  code = cli.main(['elastic-jax', 'search', *flags, '--config.search.latency=False',
                   "--config.search.objectives=('loss', 'table_mb')",
                   '--config.search.generations=4'])
  out, err = capsys.readouterr()
  assert code == 0, err
  pareto = json.loads((w / 'search' / 'pareto.json').read_text())
  front = pareto['front']
  mb = np.asarray([e['objectives']['table_mb'] for e in front])
  loss = np.asarray([e['objectives']['loss'] for e in front])
  # The table MB of each member is its f-gram count x hidden width x 4 bytes.
  want = [4e-6 * e['arch']['fgrams'] * e['arch']['hidden'] for e in front]
  np.testing.assert_allclose(mb, want, rtol=1e-6)
  assert 'table_mb' in out
  # A front of several members that trade: more table memory buys a lower loss.
  assert len(front) >= 2 and pareto_front_mask(np.stack([loss, mb], 1)).all()
  order = np.argsort(mb)
  assert np.all(np.diff(mb[order]) > 0) and np.all(np.diff(loss[order]) < 0)
  # The f-gram count is searched: the random baseline's samples hold more table sizes than the
  # two hidden widths alone give (after 40 steps of training the front's trade may come from the
  # hidden width alone; whether more f-grams pay is bench_scone's question).
  assert len({round(r['metrics']['table_mb'], 6) for r in pareto['random']}) > 2
  # The picked member exports with its truncated table and evaluates from it on the host.
  out = tmp_path / 'picked'
  code = cli.main(['elastic-jax', 'export', f'--workdir={w}', '--pick=index:0', f'--out={out}'])
  saved = json.loads(capsys.readouterr().out)
  member = front[0]['arch']
  assert code == 0 and saved['scone']['fgrams'] <= member['fgrams']
  assert saved['scone']['table_mb'] == pytest.approx(4e-6 * saved['scone']['fgrams']
                                                     * member['hidden'])
  assert cli.main(['elastic-jax', 'evaluate', f'--model={out}']) == 0
  result = json.loads(capsys.readouterr().out)
  assert result['scone_table_mb'] == pytest.approx(saved['scone']['table_mb'])
  assert result['loss'] == pytest.approx(front[0]['metrics']['loss'], rel=1e-4)
