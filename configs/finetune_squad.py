"""SQuAD fine-tuning of an exported encoder (the standard BERT recipe: windows of 384 tokens,
document stride 128, questions cut to 64 tokens, 2 epochs, batch 12, learning rate 3e-5).

  elastic-jax finetune --model=DIR --task=squad --workdir=/tmp/ft_squad \
      --config=configs/finetune_squad.py --config.finetune.squad_dir=/path/to/squad
  elastic-jax finetune --model=DIR --task=squad_v2 ... (train-v2.0.json / dev-v2.0.json)
squad_dir holds the official files (train-v1.1.json, dev-v1.1.json) or is 'tfds' (downloads
tfds:squad). `:quick` caps examples and windows (minutes on a CPU); `:tiny` is what tests use.
"""

import ml_collections

from elastic_jax.finetune import trainer


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, '', 'quick', 'tiny'):
    raise ValueError(f"configs/finetune_squad.py takes '', 'quick' or 'tiny', got {arg!r}")
  cfg = ml_collections.ConfigDict()
  ft = trainer.default_config()
  ft.squad_dir = ''  # the official JSON files' directory, or 'tfds'
  ft.seq_len = 384
  ft.doc_stride = 128
  ft.max_query_len = 64
  ft.batch_size = 12
  ft.epochs = 2
  ft.learning_rate = 3e-5
  ft.n_best = 20
  ft.max_answer_len = 30
  if arg in ('quick', 'tiny'):
    ft.seq_len = 192 if arg == 'quick' else 48
    ft.doc_stride = 64 if arg == 'quick' else 16
    ft.max_query_len = 32 if arg == 'quick' else 16
    ft.max_train_examples = 2000 if arg == 'quick' else 64
    ft.max_dev_examples = 500 if arg == 'quick' else 32
    ft.batch_size = 16
    ft.learning_rate = 1e-4 if arg == 'quick' else 3e-3
  cfg.finetune = ft
  return cfg
