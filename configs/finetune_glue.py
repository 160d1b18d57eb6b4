"""GLUE fine-tuning of an exported model (W-PCA's recipe: batch 32, 10 epochs, CoLA 50).

  elastic-jax finetune --model=DIR --task=rte --workdir=/tmp/ft_rte \
      --config=configs/finetune_glue.py
  elastic-jax finetune --model=DIR --suite=glue-small --workdir=/tmp/ft_glue \
      --config=configs/finetune_glue.py:quick
Distil a fine-tuned teacher (prediction-layer soft cross-entropy, W-PCA's gamma = 1):
  ... --config.finetune.teacher=/tmp/ft_rte_teacher
`:quick` caps examples and epochs (minutes on a CPU); `:tiny` is what the tests use.
Sentence-transformers checkpoints (all-MiniLM-L6-v2) were trained with mean pooling, not through
[CLS] / BERT's pooler (--config.finetune.pooling=mean reads them that way). From a random head
that mattered (MiniLM on STS-B, bench_glue's recipe: pooler 54.5, mean 67.3); from the probed
head it does not (68.1 and 67.3; one run each).
Every run starts from a linearly probed head (LP-FT, `finetune.linear_probe`, on by default: the
head fitted on the frozen model's features first, elastic_jax/finetune/probe.py).
Sentence pairs of a sentence-transformers model: --config.finetune.pair_encoding=siamese encodes
each sentence alone (a bi-encoder: cos(u, v) for STS-B, (u, v, |u - v|) for classes). On STS-B
(bench_glue's recipe, labels only; bench/results/bench_glue.json now and at 4f64076)
all-MiniLM-L6-v2 scores 68.1 read cross, 86.7 siamese; its 50% sub-network 31.6 and 80.2.
W-PCA does not state its learning rate; 5e-5 with 10% linear warmup then linear decay and weight
decay 0.01 are the usual BERT-small settings (TinyBERT / MobileBERT fine-tuning grids hold it).
"""

from pathlib import Path

import ml_collections

from elastic_jax.finetune import trainer

GLUE = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'glue'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, '', 'quick', 'tiny'):
    raise ValueError(f"configs/finetune_glue.py takes '', 'quick' or 'tiny', got {arg!r}")
  cfg = ml_collections.ConfigDict()
  ft = trainer.default_config()
  ft.glue_dir = str(GLUE)  # a GLUE directory of TSV files, or 'tfds' (downloads tfds:glue)
  ft.seq_len = 128
  ft.batch_size = 32  # W-PCA
  ft.epochs = 10  # W-PCA: 10 epochs for every task but CoLA
  ft.epochs_cola = 50  # W-PCA: 50 for CoLA
  ft.learning_rate = 5e-5
  if arg in ('quick', 'tiny'):
    ft.seq_len = 64 if arg == 'quick' else 32
    ft.epochs = ft.epochs_cola = 3 if arg == 'quick' else 2
    ft.max_train_examples = 2000 if arg == 'quick' else 48
    ft.max_dev_examples = 500 if arg == 'quick' else 40
    ft.batch_size = 32 if arg == 'quick' else 16
    ft.learning_rate = 1e-4 if arg == 'quick' else 1e-3
  cfg.finetune = ft
  return cfg
