"""`elastic-jax compress` on an encoder (bench_glue's path): a tiny random BERT compressed with
hidden-state MSE against the original and the masked-LM loss, no logits KL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections
import pytest

from elastic_jax import export as export_lib
from elastic_jax.compress import job as compress_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'hf'))
H = pytest.importorskip('hf_testing')


def test_compress_an_encoder_with_hidden_state_distillation(tmp_path, monkeypatch):
  """bench_glue's path: a BERT compressed with hidden-state MSE against the original and the
  masked-LM loss, no logits KL (compress keeps train.distill's weights as given)."""
  monkeypatch.setenv('ELASTIC_JAX_CACHE', str(tmp_path / 'cache'))
  bert = H.save_model('bert', tmp_path / 'bert')
  cfg = ml_collections.ConfigDict({
      'data': {'seq_len': 16, 'batch_size': 4, 'eval_batches': 1},
      'train': {'steps': 2, 'warmup_steps': 1, 'log_every': 1, 'eval_every': 0,
                'checkpoint_every': 2, 'learning_rate': 1e-3,
                'distill': {'ce': 1.0, 'logits_kl': 0.0, 'hidden_mse': 1.0}},
      'search': {'pop_size': 4, 'generations': 1, 'latency_max': 0},
      'compress': {'calibration_batches': 2, 'min_calibration_tokens': 32, 'baselines': False}})
  w = tmp_path / 'W'
  summary = compress_job.run_compress(bert, w, budgets='params=0.7', user_cfg=cfg,
                                      log=lambda m: None)
  entry = summary['budgets']['0.7']
  assert set(entry) == {'budget_params', 'search'}
  assert entry['search']['params'] <= entry['budget_params']
  saved = json.loads((w / 'config.json').read_text())
  assert saved['data']['task'] == 'mlm'
  assert saved['train']['distill']['logits_kl'] == 0.0
  assert saved['train']['distill']['hidden_mse'] == 1.0
  # Each sub-network's loss is its cross-entropy plus the hidden-state term (> 0 after sorting
  # and with the students narrower or shallower than the original).
  logged = [json.loads(l) for l in (w / 'metrics.jsonl').read_text().splitlines()]
  step = next(d for d in logged if 'train/anchor0/loss' in d)
  assert step['train/anchor0/loss'] > step['train/anchor0/ce'] + 1e-6
  assert export_lib.load(w / 'compress' / 'models' / 'search_0.7')[1]['params'] == \
      entry['search']['params']
