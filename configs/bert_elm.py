"""Encoder MLM supernet in the ELM / W-PCA search space (arXiv 2510.27037, 2504.15983).

12 layers, hidden 528, 12 heads, factorised embedding 128; each layer a BERT block or a
MobileBERT-style bottleneck block (inner width 132), FFN width in {132, 264, ..., 792}.
  elastic-jax info --config=configs/bert_elm.py
  elastic-jax train --config=configs/bert_elm.py --workdir=/tmp/bert_elm
Arguments: `small` (default, the paper's 12-layer space), `tiny` (W-PCA-Tiny: 6 layers),
`runlocal` (a CPU-sized space of the same shape, for laptops and tests).
"""

import ml_collections

from elastic_jax import data, proxies
from elastic_jax.search import config as search_config
from elastic_jax.train import config as train_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or 'small'
  if arg not in ('small', 'tiny', 'runlocal'):
    raise ValueError(f"configs/bert_elm.py takes 'small', 'tiny' or 'runlocal', got {arg!r}")
  local = arg == 'runlocal'
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0

  # BERT family: bidirectional, post-norm LayerNorm, GELU, learned positions, token types, MLM
  # head with a transform and a vocabulary bias, tied to the factorised embedding.
  cfg.model = ml_collections.ConfigDict()
  cfg.model.kind = 'encoder'
  cfg.model.vocab_size = 1024 if local else 8192  # >= tokenizer vocabulary (checked)
  cfg.model.max_len = 128
  cfg.model.positions = 'learned'
  cfg.model.norm = 'layernorm'
  cfg.model.norm_placement = 'post'
  cfg.model.norm_eps = 1e-12
  cfg.model.mlp = 'gelu'
  cfg.model.tie_embeddings = True
  cfg.model.embed_dim = 32 if local else 128  # factorised embedding (< hidden)
  cfg.model.use_bias = True
  cfg.model.output_bias = True
  cfg.model.head_transform = True
  cfg.model.type_vocab_size = 2

  # The W-PCA space: per layer {BERT, bottleneck} x FFN width; hidden and heads fixed.
  unit = 12 if local else 132  # FFN widths are multiples of hidden / 4
  cfg.space = ml_collections.ConfigDict()
  cfg.space.num_layers = 4 if local else (6 if arg == 'tiny' else 12)
  cfg.space.hidden = (48,) if local else (528,)
  cfg.space.depth = (cfg.space.num_layers,)
  cfg.space.blocks = ('transformer', 'bottleneck')
  cfg.space.heads = (4,) if local else (12,)
  cfg.space.kv_groups = ()  # multi-head attention
  cfg.space.head_dim = ()  # hidden / heads = 44
  cfg.space.ffn = tuple(unit * k for k in range(1, 7))  # 132, 264, ..., 792
  cfg.space.inner = (unit,)  # bottleneck inner width (MobileBERT-style)
  cfg.space.bottleneck_head_dim = 0  # inner / heads = 11

  # Masked LM on a local text corpus; point data.paths at your own corpus, or use
  # data.source='tfds:wikipedia/...' with internet.
  cfg.data = data.default_config()
  cfg.data.source = 'python_docs'
  cfg.data.task = 'mlm'
  cfg.data.tokenizer = 'bpe'
  cfg.data.bpe_vocab_size = cfg.model.get_ref('vocab_size')
  cfg.data.seq_len = 64 if local else 128
  # Vocabulary logits at the predicted positions only (BERT's max_predictions_per_seq): at most
  # seq_len / 4 + 4 per row (36 of 128, 20 of 64; follows --config.data.seq_len), about the mean
  # 15% plus four standard deviations, so the cap almost never binds and the vocabulary's work
  # and memory fall about 3.5x.
  cfg.data.mlm_max_predictions = cfg.data.get_ref('seq_len') // 4 + 4
  cfg.data.batch_size = 8 if local else 32
  cfg.data.eval_batches = 2 if local else 8

  # Supernet training: sandwich rule, in-place KD on the logits. ELM's block-preserving loss
  # (train.distill.block_preserving = 1) needs a trained teacher: set train.distill.teacher to an
  # exported BERT-style model. In place, where the students share the teacher's weights, it held
  # every sub-network at the unigram loss (bench/bench_elm.py).
  cfg.train = train_config.default_config()
  cfg.train.steps = 40 if local else 100_000
  cfg.train.learning_rate = 1e-3 if local else 5e-4
  cfg.train.warmup_steps = 5 if local else 2000
  cfg.train.log_every = 5 if local else 100
  cfg.train.eval_every = 0 if local else 2000
  cfg.train.checkpoint_every = 20 if local else 2000
  cfg.mesh = train_config.default_mesh()

  # Zero-cost proxies (W-PCA and baselines) for `elastic-jax proxy` and training-free search
  # (--config.search.objectives="('wpca', 'params')"); fields: elastic_jax/proxies/config.py.
  cfg.proxy = proxies.default_config()
  cfg.proxy.num_batches = min(3, cfg.data.eval_batches)  # of the data.eval_batches given

  # Architecture search on the trained supernet (every field: elastic_jax/search/config.py).
  cfg.search = search_config.default_config()
  if local:
    cfg.search.pop_size = 8
    cfg.search.generations = 6
  return cfg
