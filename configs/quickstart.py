"""Quickstart: a small decoder supernet on the embedded default corpus (Python's own docs).

Runs on a laptop CPU in minutes, needs no download:
  elastic-jax run --config=configs/quickstart.py --workdir=/tmp/elastic_quickstart
Inspect the space without training:
  elastic-jax info --config=configs/quickstart.py
`:tiny` shrinks everything further (what the tests use).
"""

import ml_collections

from elastic_jax import data, proxies
from elastic_jax.scone import config as scone_config
from elastic_jax.search import config as search_config
from elastic_jax.train import config as train_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, '', 'tiny'):
    raise ValueError(f"configs/quickstart.py takes '' or 'tiny', got {arg!r}")
  tiny = arg == 'tiny'
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0  # seeds the supernet's initialisation, data order, sampling and search

  # The model family (every exported sub-network shares it).
  cfg.model = ml_collections.ConfigDict()
  cfg.model.kind = 'decoder'  # causal LM
  cfg.model.vocab_size = 1024  # must be >= the tokenizer's vocabulary (checked)
  cfg.model.max_len = 128  # longest sequence
  cfg.model.positions = 'rotary'
  cfg.model.norm = 'rmsnorm'
  cfg.model.norm_placement = 'pre'
  cfg.model.mlp = 'swiglu'
  cfg.model.tie_embeddings = True
  cfg.model.use_bias = False
  cfg.model.dtype = 'float32'  # compute dtype ('bfloat16' on TPU)
  # Layers unrolled: on a CPU XLA's while loop costs the scanned supernet ~20% of its step time
  # (bench/results/bench_train.md) and 4 layers compile as fast either way. The TPU configs scan
  # them (model.scan_layers, the default), so that compile time stops growing with depth.
  cfg.model.scan_layers = False

  # The elastic search space, as data: allowed values per dimension.
  cfg.space = ml_collections.ConfigDict()
  cfg.space.num_layers = 2 if tiny else 4
  cfg.space.hidden = (32, 48) if tiny else (64, 96, 128)  # global hidden size
  cfg.space.depth = (1, 2) if tiny else (2, 3, 4)  # kept prefix of layers
  cfg.space.blocks = ('transformer',)  # add 'skip' for arbitrary layer subsets
  cfg.space.heads = (2, 4)  # query heads per layer
  cfg.space.kv_groups = (1, 2)  # grouped-query attention: KV groups per layer
  cfg.space.head_dim = (8,) if tiny else (16, 32)  # head size (global)
  cfg.space.ffn = (32, 64) if tiny else (128, 256, 384)  # FFN width per layer
  # SCONE's dimensions (with scone.enabled; () = the scone section's maximum alone): f-gram counts
  # used (prefixes of the frequency order), the f-gram model's depth and FFN width.
  cfg.space.fgrams = ()
  cfg.space.fgram_layers = ()
  cfg.space.fgram_ffn = ()

  # Data: the embedded default corpus with a BPE tokenizer trained on it (cached).
  cfg.data = data.default_config()
  cfg.data.source = 'python_docs'
  cfg.data.task = 'causal_lm'
  cfg.data.tokenizer = 'bpe'
  cfg.data.bpe_vocab_size = cfg.model.get_ref('vocab_size')
  cfg.data.seq_len = 32 if tiny else 128
  cfg.data.batch_size = 4 if tiny else 16
  cfg.data.eval_batches = 2 if tiny else 3  # 6,144 tokens: enough to rank, quick to score

  # Supernet training: sandwich rule with in-place distillation from the largest sub-network.
  cfg.train = train_config.default_config()
  cfg.train.steps = 30 if tiny else 600
  cfg.train.learning_rate = 3e-3
  cfg.train.warmup_steps = 5 if tiny else 30
  cfg.train.log_every = 5 if tiny else 25
  cfg.train.eval_every = 0 if tiny else 200
  cfg.train.checkpoint_every = 10 if tiny else 200
  cfg.mesh = train_config.default_mesh()
  # SCONE f-gram embeddings (off; --config.scone.enabled=True; fields: elastic_jax/scone/config.py).
  cfg.scone = scone_config.default_config()

  # Zero-cost proxies (W-PCA and baselines) for `elastic-jax proxy` and training-free search
  # (--config.search.objectives="('wpca', 'params')"); fields: elastic_jax/proxies/config.py.
  cfg.proxy = proxies.default_config()
  cfg.proxy.num_batches = 2 if tiny else 3  # of data.eval_batches

  # Architecture search on the trained supernet (every field: elastic_jax/search/config.py).
  cfg.search = search_config.default_config()
  cfg.search.pop_size = 8 if tiny else 16
  cfg.search.generations = 6 if tiny else 12
  cfg.search.latency_max = 4 if tiny else 8
  return cfg
