"""KV-cache generation from Hugging Face directories equals `transformers`' own greedy
generation (left-padded batches included), and the `generate` command runs on one."""

from __future__ import annotations

import hf_testing as H  # noqa: I001  (skips this module without the hf extra)
import numpy as np
import pytest

from elastic_jax import export as export_lib
from elastic_jax import generate as gen
from elastic_jax.cli import main

PROMPTS = [[7, 12, 5, 30, 9, 44, 2], [11, 3, 19]]
NEW = 9


@pytest.mark.parametrize('family', ['llama', 'gpt2', 'mistral', 'qwen2'])
def test_greedy_generation_equals_transformers(family, tmp_path):
  torch = H.torch
  directory = H.save_model(family, tmp_path / family, seed=3)
  model, tokenizer = export_lib.load_any(directory)
  assert tokenizer is not None
  ours = gen.Generator(model).generate(PROMPTS, NEW).tokens

  reference = H.transformers.AutoModelForCausalLM.from_pretrained(
      str(directory), dtype=torch.float32).eval()
  width = max(len(p) for p in PROMPTS)
  ids = np.zeros((len(PROMPTS), width), np.int64)
  mask = np.zeros((len(PROMPTS), width), np.int64)
  for i, p in enumerate(PROMPTS):  # left padding, as transformers expects for generation
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  with torch.no_grad():
    out = reference.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                             do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                             eos_token_id=None, pad_token_id=0)
  assert ours == out[:, width:].tolist()


def test_generate_command(tmp_path, capsys):
  directory = H.save_model('llama', tmp_path / 'llama', seed=1)
  argv = ['elastic-jax', 'generate', f'--model={directory}', '--prompt=the value of',
          '--max_new_tokens=5', '--temperature=0.8', '--top_k=10', '--top_p=0.9']
  assert main(argv) == 0
  captured = capsys.readouterr()
  assert captured.out.startswith('the value of')
  assert 'decode_tokens_per_s' in captured.err
  assert main(argv[:3] + ['--prompt=' + 'data ' * 40]) == 2  # max_position_embeddings 32
  assert 'positions' in capsys.readouterr().err
