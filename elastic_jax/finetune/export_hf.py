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


def check_exportable(model_cfg, pooling: str, siamese: bool, out: str | Path) -> None:
  """UserError unless a classifier of `model_cfg` (the backbone's ModelConfig) fine-tuned with
  `pooling` (and siamese pairs or not) can be written to `out` by `save_classifier`: what the
  CLI checks before fine-tuning, so a run is not spent on an export that will be refused."""
  if siamese:
    raise UserError("a classifier fine-tuned with finetune.pair_encoding='siamese' reads each "
                    'sentence alone; BertForSequenceClassification reads the pair as one '
                    "sequence: drop --out (the fine-tuning checkpoint stays in the workdir), or "
                    "fine-tune with 'cross'")
  if pooling not in ('auto', 'pooler'):
    raise UserError(f"a classifier fine-tuned with finetune.pooling={pooling!r} has no "
                    "transformers form (BertForSequenceClassification reads the pooler): drop "
                    "--out (the fine-tuning checkpoint stays in the workdir), or fine-tune with "
                    "pooling 'auto'")
  if model_cfg.kind != 'encoder' or not model_cfg.pooler:
    raise UserError('only BERT-style classifiers (an encoder with a pooler) export to '
                    'AutoModelForSequenceClassification: drop --out (the fine-tuning checkpoint '
                    'stays in the workdir)')
  export_lib.check_out(out)


def check_before_finetuning(model_dir: str | Path, finetune_cfg, is_pair: bool,
                            out: str | Path) -> None:
  """`check_exportable` for the classifier that fine-tuning `model_dir` with `finetune_cfg`
  will make, from the model's config alone (no weights read)."""
  model_dir = Path(model_dir)
  if export_lib.is_export(model_dir):
    model_cfg = export_lib.load_abstract(model_dir)[0].cfg
  else:  # a Hugging Face directory
    model_cfg = convert.read_header(model_dir)[0]
  siamese = is_pair and finetune_cfg.pair_encoding == 'siamese'
  check_exportable(model_cfg, finetune_cfg.pooling, siamese, out)


def save_classifier(clf: Classifier, task: GlueTask, out: str | Path, *,
                    tokenizer_dir: str | Path | None = None, base: dict | None = None) -> dict:
  """Writes `clf` as a Hugging Face sequence-classification directory (atomically)."""
  model = clf.backbone
  check_exportable(model.cfg, clf.pooling, clf.siamese, out)
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
