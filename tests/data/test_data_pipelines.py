"""Training streams and evaluation batches: shapes, determinism, resume, process shards."""

import itertools
import json

import data_testing
import numpy as np
import pytest

import elastic_jax.data as data
from elastic_jax.data import pipelines
from elastic_jax.errors import UserError

LM_KEYS = {'tokens': np.int32, 'targets': np.int32, 'weights': np.float32,
           'segment_ids': np.int32, 'positions': np.int32}


def _assert_equal_batches(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


@pytest.fixture
def tiny_corpus(tmp_path, data_cache):
  """Thirteen short distinct lines: epochs go by in a few batches."""
  path = tmp_path / 'tiny.txt'
  path.write_text(''.join(f'line number {i} of the tiny corpus\n' for i in range(13)))
  cfg = data.default_config()
  cfg.update({'source': 'text_files', 'paths': [str(path)], 'doc_boundary': 'line',
              'validation_fraction': 0.0, 'seq_len': 17, 'batch_size': 4,
              'cache_dir': str(data_cache)})
  return cfg


@pytest.mark.parametrize('task', ['causal_lm', 'mlm'])
def test_lm_batch_layout(task, shared_data, data_cache):
  cfg = data_testing.shakespeare_config(shared_data, data_cache)
  cfg.task = task
  batch = next(data.train_iterator(cfg))
  assert batch.keys() == LM_KEYS.keys()
  for key, dtype in LM_KEYS.items():
    assert batch[key].shape == (6, 61) and batch[key].dtype == dtype, key


@pytest.mark.parametrize('task, regression', [('mrpc', False), ('stsb', True), ('sst2', False)])
def test_glue_batch_layout(task, regression, shared_data, data_cache):
  glue_dir = data_testing.glue_dir(shared_data)
  cfg = {'source': 'glue', 'task': 'glue', 'glue_dir': str(glue_dir), 'glue_task': task,
         'seq_len': 37, 'batch_size': 8, 'cache_dir': str(data_cache)}
  tok = data.load_tokenizer(cfg)
  batch = next(data.train_iterator(cfg))
  assert batch['label'].shape == (8,) and batch['weights'].shape == (8,)
  assert batch['label'].dtype == (np.float32 if regression else np.int32)
  for key in ('tokens', 'segment_ids', 'positions', 'token_types'):
    assert batch[key].shape == (8, 37) and batch[key].dtype == np.int32
  for tokens, types, seg, pos in zip(batch['tokens'], batch['token_types'],
                                     batch['segment_ids'], batch['positions']):
    n = seg.sum()
    assert (seg[:n] == 1).all() and (seg[n:] == 0).all() and (tokens[n:] == tok.pad_id).all()
    np.testing.assert_array_equal(pos[:n], np.arange(n))
    assert tokens[0] == tok.cls_id and tokens[n - 1] == tok.sep_id
    seps = np.flatnonzero(tokens == tok.sep_id)
    if task == 'sst2':
      assert len(seps) == 1 and not types.any()
    else:  # [cls] A [sep] B [sep]: type 0 up to the first [sep], 1 after it.
      assert len(seps) == 2
      np.testing.assert_array_equal(types[:n], np.arange(n) > seps[0])


@pytest.mark.parametrize('task', ['causal_lm', 'mlm'])
def test_resume_gives_the_uninterrupted_batches(task, shared_data, data_cache):
  cfg = data_testing.shakespeare_config(shared_data, data_cache)
  cfg.task = task
  uninterrupted = data.train_iterator(cfg)
  want = [next(uninterrupted) for _ in range(9)]
  first = data.train_iterator(cfg)
  for _ in range(4):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # As stored beside a checkpoint.
  resumed = data.train_iterator(cfg)
  resumed.set_state(state)
  _assert_equal_batches([next(resumed) for _ in range(5)], want[4:])


def test_resume_across_epochs_and_reshuffled_epochs(tiny_corpus):
  cfg = tiny_corpus
  cfg.task = 'mlm'
  want = list(itertools.islice(data.train_iterator(cfg), 12))
  for stop in (3, 7):
    it = data.train_iterator(cfg)
    for _ in range(stop):
      next(it)
    resumed = data.train_iterator(cfg)
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    _assert_equal_batches(list(itertools.islice(resumed, 12 - stop)), want[stop:])
  order = pipelines.record_indices(13, shuffle=True, seed=0, repeat=True)
  epochs = [[order[e * 13 + i] for i in range(13)] for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(13))
  assert epochs[0] != epochs[1]  # A new order every epoch.


def test_glue_resume(shared_data, data_cache):
  glue_dir = data_testing.glue_dir(shared_data)
  cfg = {'source': 'glue', 'task': 'glue', 'glue_dir': str(glue_dir), 'glue_task': 'rte',
         'seq_len': 29, 'batch_size': 8, 'cache_dir': str(data_cache)}
  want = list(itertools.islice(data.train_iterator(cfg), 6))
  it = data.train_iterator(cfg)
  next(it), next(it)
  resumed = data.train_iterator(cfg)
  resumed.set_state(json.loads(json.dumps(it.get_state())))
  _assert_equal_batches(list(itertools.islice(resumed, 4)), want[2:])


def test_stream_is_a_function_of_the_seed(shared_data, data_cache):
  cfg = data_testing.shakespeare_config(shared_data, data_cache)
  first = list(itertools.islice(data.train_iterator(cfg), 3))
  _assert_equal_batches(list(itertools.islice(data.train_iterator(cfg), 3)), first)
  cfg.seed = 1
  other = next(data.train_iterator(cfg))
  assert not np.array_equal(other['tokens'], first[0]['tokens'])


def test_process_shards_are_disjoint_and_cover_each_epoch():
  for count in (2, 3):
    shards = [pipelines.record_indices(1009, process_index=p, process_count=count, shuffle=True,
                                       seed=4) for p in range(count)]
    seen = [set(shard[i] for i in range(len(shard))) for shard in shards]
    assert sum(len(s) for s in seen) == 1009
    assert set().union(*seen) == set(range(1009))


def test_two_processes_read_their_own_documents(tiny_corpus):
  cfg = tiny_corpus
  cfg.shuffle = False
  tok = data.load_tokenizer(cfg)
  docs_per_process = []
  for process in range(2):
    it = data.train_iterator(cfg, process_index=process, process_count=2)
    batch = next(it)
    assert batch['tokens'].shape == (2, 17)  # batch_size // process_count rows.
    stream = []
    for batch in itertools.islice(it, 30):
      for tokens, targets, seg in zip(batch['tokens'], batch['targets'], batch['segment_ids']):
        for s in np.unique(seg):
          x, y = tokens[seg == s], targets[seg == s]
          stream.append(np.concatenate([x[:1], y]) if x[0] == tok.bos_id else y)
    stream = np.concatenate(stream)
    docs = [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.bos_id))[1:-1]]
    shard_size = 7 - process  # Records 0, 2, ..., 12 and 1, 3, ..., 11.
    docs_per_process.append(set(docs[:shard_size]))
    assert set(docs) == docs_per_process[-1]  # Later epochs repeat the same shard.
  assert not docs_per_process[0] & docs_per_process[1]
  assert docs_per_process[0] | docs_per_process[1] == {
      f'line number {i} of the tiny corpus' for i in range(13)}


def test_eval_batches_are_fixed(shared_data, data_cache):
  cfg = data_testing.shakespeare_config(shared_data, data_cache)
  cfg.task = 'mlm'
  first = data.eval_batches(cfg)
  assert len(first) == 3
  for batch in first:
    assert batch['tokens'].shape == (6, 61)  # Global batch size, whatever the process count.
  _assert_equal_batches(data.eval_batches(cfg), first)
  train = next(data.train_iterator(cfg))
  assert not np.array_equal(train['targets'], first[0]['targets'])  # Held-out documents.


def test_eval_batches_whole_split_pads_the_last(shared_data, data_cache):
  cfg = data_testing.shakespeare_config(shared_data, data_cache)
  cfg.eval_batches = 0
  cfg.seq_len = 509
  cfg.batch_size = 7
  batches = data.eval_batches(cfg)
  stats = data.describe(cfg)
  assert len(batches) == stats['eval_batches']['available']
  real = sum(int(b['weights'].sum()) for b in batches)
  assert real == stats['splits']['validation']['tokens']
  weights = np.concatenate([b['weights'] for b in batches]).ravel()
  assert weights[:real].all() and not weights[real:].any()  # Padding only at the very end.
  assert len(weights) - real < 7 * 509


def test_glue_eval_batches_cover_the_dev_set(shared_data, data_cache):
  glue_dir = data_testing.glue_dir(shared_data)
  cfg = {'source': 'glue', 'task': 'glue', 'glue_dir': str(glue_dir), 'glue_task': 'wnli',
         'seq_len': 64, 'batch_size': 16, 'eval_batches': 0, 'cache_dir': str(data_cache)}
  batches = data.eval_batches(cfg)
  dev_rows = 71
  assert len(batches) == 5 and sum(b['weights'].sum() for b in batches) == dev_rows
  last = batches[-1]
  assert (last['segment_ids'][dev_rows % 16:] == 0).all()


def test_truncate_pair_matches_the_loop():
  def reference(len1, len2, budget):
    while len1 + len2 > budget:
      if len1 > len2:
        len1 -= 1
      else:
        len2 -= 1
    return len1, len2
  for len1, len2, budget in itertools.product(range(12), range(12), range(1, 15)):
    assert pipelines.truncate_pair(len1, len2, budget) == reference(len1, len2, budget)


def test_process_arguments_are_checked(shared_data, data_cache):
  cfg = data_testing.shakespeare_config(shared_data, data_cache)
  with pytest.raises(UserError, match='not divisible'):
    data.train_iterator(cfg, process_index=0, process_count=4)
  with pytest.raises(UserError, match='process_index'):
    data.train_iterator(cfg, process_index=2, process_count=2)


_WORKER_RESUME = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[3])
import data_testing
import elastic_jax.data as data
from pathlib import Path
cfg = data_testing.shakespeare_config(Path(sys.argv[1]), Path(sys.argv[2]))
cfg.num_workers = 2
it = data.train_iterator(cfg)
for _ in range(3):
  next(it)
state = json.loads(json.dumps(it.get_state()))
want = [next(it) for _ in range(3)]
resumed = data.train_iterator(cfg)
resumed.set_state(state)
got = [next(resumed) for _ in range(3)]
for g, w in zip(got, want):
  assert g.keys() == w.keys()
  for key in w:
    np.testing.assert_array_equal(g[key], w[key], err_msg=key)
assert want[0]['tokens'].shape == (6, 61)
print('resumed exactly')
"""


@pytest.mark.slow  # Starting two grain worker processes takes several seconds.
def test_worker_processes_resume_exactly(shared_data, data_cache):
  """In a process of its own: grain's worker processes and the shared-memory threads they leave
  in their parent must not outlive this test in the suite's process."""
  import subprocess
  import sys
  from pathlib import Path
  data_testing.shakespeare(shared_data)  # skips when absent
  run = subprocess.run([sys.executable, '-c', _WORKER_RESUME, str(shared_data), str(data_cache),
                        str(Path(__file__).parent)], capture_output=True, text=True, timeout=600)
  assert run.returncode == 0 and 'resumed exactly' in run.stdout, run.stderr[-3000:]
