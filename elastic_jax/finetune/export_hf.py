"""A fine-tuned classifier as a `transformers` `AutoModelForSequenceClassification` directory.

BERT only: `BertForSequenceClassification` computes classifier(pooler(hidden)[CLS]) exactly as
`Classifier` does (dropout is off at inference). Decoder families score the last token without a
bias and GPT-2 / Llama checkpoints find it by the pad token, so they are refused rather than
approximated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from elastic_jax import export as export_lib
from elastic_jax.data.glue_tasks import GlueTask
from elastic_jax.errors import UserError
from elastic_jax.finetune.classifier import Classifier
from elastic_jax.hf import checkpoint, convert


def save_classifier(clf: Classifier, task: GlueTask, out: str | Path, *,
                    tokenizer_dir: str | Path | None = None, base: dict | None = None) -> dict:
  """Writes `clf` as a Hugging Face sequence-classification directory (atomically)."""
  model = clf.backbone
  if clf.siamese:
    raise UserError("a classifier fine-tuned with finetune.pair_encoding='siamese' reads each "
                    'sentence alone; BertForSequenceClassification reads the pair as one '
                    "sequence: keep the fine-tuning checkpoint, or fine-tune with 'cross'")
  if clf.pooling not in ('auto', 'pooler'):
    raise UserError(f"a classifier fine-tuned with finetune.pooling={clf.pooling!r} has no "
                    "transformers form (BertForSequenceClassification reads the pooler); keep the "
                    "fine-tuning checkpoint instead, or fine-tune with pooling 'auto'")
  if model.cfg.kind != 'encoder' or not model.cfg.pooler:
    raise UserError('only BERT-style classifiers (an encoder with a pooler) export to '
                    'AutoModelForSequenceClassification; keep the fine-tuning checkpoint instead')
  config, tensors, report = convert.hf_tensors(model, base)
  if config['model_type'] != 'bert':
    raise UserError(f'a {config["model_type"]} classifier has no exact transformers form')
  tensors = {k: v for k, v in tensors.items() if not k.startswith('cls.')}  # the MLM head
  tensors['classifier.weight'] = np.asarray(clf.kernel[...], np.float32).T
  tensors['classifier.bias'] = np.asarray(clf.bias[...], np.float32)
  labels = task.label_names or ('score',)
  config.update(architectures=['BertForSequenceClassification'], num_labels=len(labels),
                id2label={str(i): n for i, n in enumerate(labels)},
                label2id={n: i for i, n in enumerate(labels)},
                problem_type='regression' if task.is_regression else
                'single_label_classification', finetuning_task=task.name)
  files = checkpoint.tokenizer_files(tokenizer_dir) if tokenizer_dir else {}

  def write(tmp: Path):
    checkpoint.write(tmp, config, tensors, files)
    (tmp / convert.REPORT_FILE).write_text(json.dumps({**report, 'task': task.name}, indent=2))

  export_lib.write_export_dir(out, write)
  return {'out': str(out), 'task': task.name, 'num_labels': len(labels),
          'params_real': report['params_real']}
