"""Decoder supernet on a local text file: tiny-shakespeare, character (byte) level.

  elastic-jax train --config=configs/shakespeare_decoder.py:small --workdir=/tmp/shakespeare
  elastic-jax train --config=configs/shakespeare_decoder.py --config.data.paths="('my.txt',)" ...
Arguments: '' (default: a 6-layer, up to 384-wide supernet for an accelerator), `small` (a CPU
variant that trains in a few minutes on 2 cores), `tiny` (tests).
The default path is the repository's sibling `shared/data/tinyshakespeare/input.txt`.
"""

from pathlib import Path

import ml_collections

from elastic_jax import data, proxies
from elastic_jax.scone import config as scone_config
from elastic_jax.search import config as search_config
from elastic_jax.train import config as train_config

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / 'shared/data/tinyshakespeare/input.txt'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size = arg or 'full'
  if size not in ('full', 'small', 'tiny'):
    raise ValueError(f"configs/shakespeare_decoder.py takes '', 'small' or 'tiny', got {arg!r}")
  full, tiny = size == 'full', size == 'tiny'
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0

  cfg.model = ml_collections.ConfigDict()
  cfg.model.kind = 'decoder'
  cfg.model.vocab_size = 262  # the byte tokenizer: 256 bytes + 6 special tokens
  cfg.model.max_len = 256 if full else 128
  cfg.model.positions = 'rotary'
  cfg.model.norm = 'rmsnorm'
  cfg.model.norm_placement = 'pre'
  cfg.model.mlp = 'swiglu'
  cfg.model.tie_embeddings = True
  cfg.model.use_bias = False

  cfg.space = ml_collections.ConfigDict()
  cfg.space.num_layers = 6 if full else (2 if tiny else 4)
  cfg.space.hidden = (192, 256, 384) if full else ((32, 48) if tiny else (64, 96, 128))
  cfg.space.depth = (2, 3, 4, 5, 6) if full else ((1, 2) if tiny else (2, 3, 4))
  cfg.space.blocks = ('transformer', 'skip')  # layer subsets too
  cfg.space.heads = (2, 4, 6) if full else (2, 4)
  cfg.space.kv_groups = (1, 2) if not full else (1, 2, 3)
  cfg.space.head_dim = (64,) if full else ((8,) if tiny else (32,))
  cfg.space.ffn = (256, 512, 768, 1024) if full else ((32, 64) if tiny else (128, 256, 384))
  # SCONE's dimensions (with scone.enabled; () = the scone section's maximum alone): f-gram counts
  # used (prefixes of the frequency order), the f-gram model's depth and FFN width.
  cfg.space.fgrams = ()
  cfg.space.fgram_layers = ()
  cfg.space.fgram_ffn = ()

  cfg.data = data.default_config()
  cfg.data.source = 'text_files'
  cfg.data.paths = (str(SHAKESPEARE),)
  cfg.data.doc_boundary = 'blank_line'  # one speech per document
  cfg.data.task = 'causal_lm'
  cfg.data.tokenizer = 'bytes'
  cfg.data.seq_len = 256 if full else (32 if tiny else 128)
  cfg.data.batch_size = 64 if full else (4 if tiny else 16)
  cfg.data.eval_batches = 16 if full else (2 if tiny else 8)

  cfg.train = train_config.default_config()
  cfg.train.steps = 5000 if full else (20 if tiny else 800)
  cfg.train.learning_rate = 2e-3 if full else 3e-3
  cfg.train.warmup_steps = 200 if full else (2 if tiny else 50)
  cfg.train.log_every = 50 if full else (5 if tiny else 25)
  cfg.train.eval_every = 500 if full else (0 if tiny else 200)
  cfg.train.checkpoint_every = 1000 if full else (10 if tiny else 200)
  cfg.mesh = train_config.default_mesh()
  # SCONE f-gram embeddings (off; --config.scone.enabled=True; fields: elastic_jax/scone/config.py).
  cfg.scone = scone_config.default_config()

  # Zero-cost proxies (W-PCA and baselines) for `elastic-jax proxy` and training-free search
  # (--config.search.objectives="('wpca', 'params')"); fields: elastic_jax/proxies/config.py.
  cfg.proxy = proxies.default_config()
  cfg.proxy.num_batches = min(3, cfg.data.eval_batches)  # of the data.eval_batches given

  # Architecture search on the trained supernet (every field: elastic_jax/search/config.py).
  cfg.search = search_config.default_config()
  if tiny:
    cfg.search.pop_size = 8
    cfg.search.generations = 6
  return cfg
