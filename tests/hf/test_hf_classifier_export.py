"""A fine-tuned BERT classifier exported to AutoModelForSequenceClassification computes our
logits (padded batch, token types), for classification and regression; decoders are refused."""

from __future__ import annotations

import hf_testing as H  # noqa: I001  (skips this module without the hf extra)
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from elastic_jax.data.glue_tasks import get_task
from elastic_jax.errors import UserError
from elastic_jax.finetune.classifier import Classifier
from elastic_jax.finetune.export_hf import save_classifier
from elastic_jax.hf import convert


@pytest.mark.parametrize('task_name', ['mnli', 'stsb'])
def test_exported_classifier_equals_transformers(task_name, tmp_path):
  torch = H.torch
  task = get_task(task_name)
  directory = H.save_model('bert', tmp_path / 'bert', seed=2)
  imported = convert.load_dense(directory)
  clf = randomize(Classifier(imported.model, task.num_labels, rngs=nnx.Rngs(0)), 3, 0.5)
  save_classifier(clf, task, tmp_path / 'out', tokenizer_dir=directory, base=imported.hf_config)
  batch = H.padded_batch('bert', seed=4)
  ours = np.asarray(clf({k: jnp.asarray(v) for k, v in H.ours(batch).items()}))
  reference = H.transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / 'out'), dtype=torch.float32).eval()
  assert reference.config.num_labels == task.num_labels
  with torch.no_grad():
    theirs = reference(input_ids=torch.as_tensor(batch['tokens'], dtype=torch.long),
                       attention_mask=torch.as_tensor(batch['attention_mask']),
                       token_type_ids=torch.as_tensor(batch['token_types'],
                                                      dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_decoder_classifier_is_refused(tmp_path):
  directory = H.save_model('llama', tmp_path / 'llama')
  clf = Classifier(convert.load_dense(directory).model, 2, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match='BERT-style'):
    save_classifier(clf, get_task('rte'), tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_mean_pooled_classifier_is_refused(tmp_path):
  """BertForSequenceClassification reads the pooler: a mean-pooled head has no exact form."""
  directory = H.save_model('bert', tmp_path / 'bert')
  clf = Classifier(convert.load_dense(directory).model, 2, pooling='mean', rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match="pooling='mean' has no transformers form"):
    save_classifier(clf, get_task('rte'), tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
