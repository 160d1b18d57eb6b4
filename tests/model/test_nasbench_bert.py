"""NAS-Bench-BERT's 500 architectures in the FlexiBERT space; bad benchmark input; training-free
W-PCA search on the FlexiBERT space through the command line."""

import copy
import json
import re

import jax
import numpy as np
import pytest
from conftest import REPO, load_config
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import cli, export, nasbench_bert
from elastic_jax.config import model_config, space_config
from elastic_jax.errors import UserError
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space


@pytest.fixture(scope='module')
def flexibert():
  cfg = load_config('flexibert')
  return model_config(cfg.model), space_config(cfg.space)


@pytest.mark.slow  # ~1 CPU-minute: 500 exports from a 30k-vocabulary supernet
def test_every_benchmark_arch_parses_validates_and_exports(shared_data, flexibert):
  model_cfg, space_cfg = flexibert
  records = nasbench_bert.load(shared_data / 'nas_bench_bert')
  assert len(records) == 500
  space = Space(model_cfg, space_cfg)
  supernet = Model(model_cfg, space_cfg.supernet_dims(), rngs=nnx.Rngs(0))
  archs = [nasbench_bert.to_arch(r, space_cfg) for r in records]
  params = np.asarray(jax.vmap(lambda a: space.cost(a)['params'])(arch_lib.stack(archs)))
  seen_ops = set()
  for record, arch, p in zip(records, archs, params):
    layers = record['hparams']['model_hparam_overrides']['nas_config']['encoder_layers']
    # The JSON round trip is exact and keeps the benchmark's choices.
    assert arch_lib.to_json(arch_lib.from_json(arch_lib.to_json(arch), space_cfg)) == \
        arch_lib.to_json(arch)
    dense = export.export(supernet, space_cfg, arch)
    assert dense.dims.hidden == record['hparams']['model_hparam_overrides']['hidden_size']
    assert len(dense.dims.layers) == len(layers)
    for dims, layer in zip(dense.dims.layers, layers):
      assert dims.blocks[0] == nasbench_bert.block_of(layer, '')
      assert (dims.heads, dims.ffn, dims.ffn_layers) == (
          layer['num_operation_heads'], layer['feed_forward_dimension'],
          layer['num_feed_forward'])
      seen_ops.add(dims.blocks[0])
    assert export.param_count(dense) == int(p)
  assert len(seen_ops) == 6


@pytest.mark.parametrize('edit, message', [
    (lambda l: l[0].update(operation_type='RNN'), 'operation RNN/SDP is outside the FlexiBERT'),
    (lambda l: l[0].update(operation_parameter=7), 'outside the FlexiBERT space'),
    (lambda l: l.append(copy.deepcopy(l[0])), 'encoder layers is outside the space; allowed'),
    (lambda l: l[0].update(num_operation_heads=3), 'layers[0].heads=3 is outside'),
    (lambda l: l[0].update(num_feed_forward=2), 'layers[0].ffn_layers=2 is outside'),
])
def test_bad_benchmark_records_are_one_clear_line(flexibert, edit, message):
  _, space_cfg = flexibert
  record = {'id': 7, 'hparams': {'model_hparam_overrides': {'hidden_size': 128, 'nas_config': {
      'encoder_layers': [{'operation_type': 'SA', 'operation_parameter': 'SDP',
                          'num_operation_heads': 2, 'feed_forward_dimension': 512,
                          'num_feed_forward': 1}] * 2}}}}
  record = copy.deepcopy(record)
  nasbench_bert.to_arch(record, space_cfg)  # the unedited record is in the space
  edit(record['hparams']['model_hparam_overrides']['nas_config']['encoder_layers'])
  with pytest.raises(UserError, match=re.escape(message)) as e:
    nasbench_bert.to_arch(record, space_cfg)
  assert 'benchmark record 7' in str(e.value) and '\n' not in str(e.value)


def test_missing_benchmark_file_is_one_clear_line(tmp_path):
  with pytest.raises(UserError, match='BERT_benchmark.json does not exist'):
    nasbench_bert.load(tmp_path)


def test_training_free_wpca_search_on_the_flexibert_space(capsys, tmp_path, data_cache):
  config = f'--config={REPO}/configs/flexibert.py:runlocal'
  cfg = load_config('flexibert', 'runlocal')
  space = Space(model_config(cfg.model), space_config(cfg.space))
  low, high = space.parameter_range()
  budget = (low + high) // 2
  code = cli.main(['elastic-jax', 'search', config, f'--workdir={tmp_path}',
                   f'--config.data.cache_dir={data_cache}', '--config.search.fitness=wpca',
                   f'--config.search.budgets.params={budget}', '--config.search.pop_size=6',
                   '--config.search.generations=2', '--config.search.latency=False'])
  _, err = capsys.readouterr()
  assert code == 0, err
  pareto = json.loads((tmp_path / 'search' / 'pareto.json').read_text())
  assert pareto['objectives'] == ['wpca']
  assert pareto['front']
  for member in pareto['front']:
    assert member['metrics']['params'] <= budget
    arch = arch_lib.from_json(member['arch'], space.cfg)  # a FlexiBERT arch of the space
    assert int(space.cost(arch)['params']) == member['metrics']['params']
