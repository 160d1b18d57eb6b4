"""Data for elastic_jax: TFDS-built corpora and GLUE, tokenizers, and resumable grain pipelines.

The rest of the project needs only these names:
  default_config()        the `data` config section
  train_iterator(cfg)     the endless, checkpointable training stream of one process
  eval_batches(cfg)       the fixed validation batches used by evaluation and search
  train_documents(cfg)    the training split's framed documents in chunks (corpus statistics)
  merge_process_states / process_state   a run's data position from / for each process
  load_tokenizer(cfg)     the tokenizer; check_vocab(tokenizer, model_vocab_size)
  check_lm_task(cfg)      UserError unless data.task models tokens (not GLUE)
  describe(cfg)           sizes and facts, for `elastic-jax data`
  glue_task_info(task)    (num_labels, metric_name, is_regression)
"""

from elastic_jax.data.config import DataConfig, check_lm_task, default_config
from elastic_jax.data.describe import describe
from elastic_jax.data.glue_tasks import glue_task_info
from elastic_jax.data.pipelines import (
    eval_batches,
    merge_process_states,
    process_state,
    train_documents,
    train_iterator,
)
from elastic_jax.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    check_vocab,
    load_tokenizer,
)

__all__ = [
    'ByteTokenizer',
    'DataConfig',
    'HFTokenizer',
    'Tokenizer',
    'check_lm_task',
    'check_vocab',
    'default_config',
    'describe',
    'eval_batches',
    'glue_task_info',
    'load_tokenizer',
    'merge_process_states',
    'process_state',
    'train_documents',
    'train_iterator',
]
