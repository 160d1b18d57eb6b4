"""Tiny random Hugging Face checkpoints made with `transformers` itself, the independent reference.

Every parameter (biases and norm scales included) is perturbed away from its initial value, so a
mapping that confused a bias with zero or a scale with one fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the hf extra (torch) is not installed: '
                            "pip install -e '.[hf]'")
transformers = pytest.importorskip('transformers', reason="the hf extra is not installed: "
                                   "pip install -e '.[hf]'")

VOCAB = 61
WORDS = ('the of and to in is that for it as with was on be by this are or from at an not '
         'which but have has def class return import self if else while none true false print '
         'list dict set int str value data file path name type object module function').split()


def _tokenizer(encoder: bool):
  """A word-level tokenizer of VOCAB ids (specials first) in `tokenizers`' own format."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  specials = (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] if encoder
              else ['<|endoftext|>', '<unk>'])
  vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
  assert len(vocab) <= VOCAB
  tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(specials)
  roles = ({'pad_token': '[PAD]', 'cls_token': '[CLS]', 'sep_token': '[SEP]',
            'mask_token': '[MASK]', 'unk_token': '[UNK]'} if encoder else
           {'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>',
            'pad_token': '<|endoftext|>', 'unk_token': '<unk>'})
  return tok, roles


def make_model(family: str, seed: int = 0):
  """A tiny random `transformers` model of `family` (eval mode)."""
  torch.manual_seed(seed)
  common = dict(vocab_size=VOCAB, num_hidden_layers=3)
  if family == 'gpt2':
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=24, n_layer=3, n_head=3, n_inner=40))
  elif family == 'llama':  # grouped-query attention, explicit head size
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **common, hidden_size=24, intermediate_size=40, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=32, rope_theta=500.0))
  elif family == 'mistral':  # untied output, head size != hidden / heads
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        **common, hidden_size=24, intermediate_size=40, num_attention_heads=6,
        num_key_value_heads=2, head_dim=6, max_position_embeddings=32, sliding_window=None))
  elif family == 'qwen2':  # q/k/v biases
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **common, hidden_size=24, intermediate_size=40, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=32, tie_word_embeddings=True))
  elif family == 'bert':  # pooler, MLM head and the next-sentence head (dropped on import)
    model = transformers.BertForPreTraining(transformers.BertConfig(
        **common, hidden_size=24, num_attention_heads=3, intermediate_size=40,
        max_position_embeddings=32, type_vocab_size=2))
  else:
    raise ValueError(family)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model.eval()


FAMILIES = ('gpt2', 'llama', 'mistral', 'qwen2', 'bert')


def save_model(family: str, directory: Path, seed: int = 0) -> Path:
  """A tiny checkpoint directory with its tokenizer, as `save_pretrained` writes it."""
  make_model(family, seed).save_pretrained(str(directory))
  tok, roles = _tokenizer(family == 'bert')
  tok.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps(roles))
  return directory


def padded_batch(family: str, seed: int = 0, b: int = 3, t: int = 13) -> dict:
  """Random tokens; row 1 right-padded (attention_mask 0) to check masking too."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, VOCAB, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[1, t - 4:] = 0
  batch = {'tokens': tokens, 'attention_mask': mask}
  if family == 'bert':
    batch['token_types'] = (np.arange(t)[None] >= t // 2).astype(np.int32).repeat(b, 0)
  return batch


def ours(batch: dict) -> dict:
  """The batch as elastic_jax models read it (segment 0 = padding)."""
  out = {'tokens': batch['tokens'], 'segment_ids': batch['attention_mask']}
  if 'token_types' in batch:
    out['token_types'] = batch['token_types']
  return out


def reference_logits(model_or_dir, batch: dict) -> np.ndarray:
  """transformers' logits for a model object or a saved directory."""
  if isinstance(model_or_dir, (str, Path)):
    from elastic_jax.hf import convert
    return convert.logits_reference(model_or_dir, batch)
  kwargs = {'input_ids': torch.as_tensor(batch['tokens'], dtype=torch.long),
            'attention_mask': torch.as_tensor(batch['attention_mask'])}
  if 'token_types' in batch:
    kwargs['token_type_ids'] = torch.as_tensor(batch['token_types'], dtype=torch.long)
  with torch.no_grad():
    out = model_or_dir(**kwargs)
  return (out.prediction_logits if hasattr(out, 'prediction_logits') else out.logits).numpy()


def max_scaled_diff(a, b, mask) -> float:
  """Max |a - b| over unpadded positions, relative to max(1, max |b|)."""
  m = np.asarray(mask, bool)
  a, b = np.asarray(a)[m], np.asarray(b)[m]
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
