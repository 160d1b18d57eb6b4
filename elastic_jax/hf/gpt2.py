"""GPT-2 checkpoints: learned positions, pre-norm LayerNorm, tanh-GELU, fused q/k/v (`c_attn`)
stored as Conv1D weights ([in, out], the transpose of a torch Linear), tied output embedding."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from elastic_jax.config import ModelConfig
from elastic_jax.hf.family import expect, prefix, refuse, require
from elastic_jax.hf.layout import Shape, layer_key

MODEL_TYPES = ('gpt2',)
_ACTIVATIONS = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu',
                'relu': 'relu'}


def model_config(hf: Mapping, names: Collection[str] = ()) -> tuple[dict, Shape]:
  act = require(hf, 'activation_function', tuple(_ACTIVATIONS), 'gelu_new')
  require(hf, 'scale_attn_weights', (True,), True)
  require(hf, 'scale_attn_by_inverse_layer_idx', (False,), False)
  if hf.get('add_cross_attention'):
    raise refuse(hf, 'add_cross_attention', True, 'only decoder-only GPT-2 is supported')
  hidden, heads = int(hf['n_embd']), int(hf['n_head'])
  if hidden % heads:
    raise refuse(hf, 'n_head', heads, f'must divide n_embd={hidden}')
  shape = Shape(hidden=hidden, heads=heads, kv_groups=heads, head_dim=hidden // heads,
                ffn=int(hf.get('n_inner') or 4 * hidden), num_layers=int(hf['n_layer']))
  cfg = dict(kind='decoder', vocab_size=int(hf['vocab_size']), max_len=int(hf['n_positions']),
             positions='learned', norm='layernorm', norm_placement='pre',
             norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)), mlp=_ACTIVATIONS[act],
             tie_embeddings=bool(hf.get('tie_word_embeddings', True)), use_bias=True,
             init_std=float(hf.get('initializer_range', 0.02)))
  return cfg, shape


def to_native(t: Mapping, hf: Mapping, s: Shape) -> dict[str, np.ndarray]:
  pre = prefix(t, 'wte.weight', ('transformer.', ''))
  d, n, hd = s.hidden, s.heads, s.head_dim
  p = {'embed.tokens': t[pre + 'wte.weight'], 'embed.positions': t[pre + 'wpe.weight'],
       'head.final_norm.scale': t[pre + 'ln_f.weight'],
       'head.final_norm.bias': t[pre + 'ln_f.bias']}
  if not hf.get('tie_word_embeddings', True):
    p['head.out'] = t['lm_head.weight'].T
  for i in range(s.num_layers):
    h = f'{pre}h.{i}.'
    qkv_w = t[h + 'attn.c_attn.weight']  # [D, 3D]: q | k | v
    qkv_b = t[h + 'attn.c_attn.bias']
    for j, name in enumerate(('q', 'k', 'v')):
      p[layer_key(i, f'attn.{name}')] = qkv_w[:, j * d:(j + 1) * d].reshape(d, n, hd)
      p[layer_key(i, f'attn.{name}_bias')] = qkv_b[j * d:(j + 1) * d].reshape(n, hd)
    p[layer_key(i, 'attn.o')] = t[h + 'attn.c_proj.weight'].reshape(n, hd, d)
    p[layer_key(i, 'attn.o_bias')] = t[h + 'attn.c_proj.bias']
    p[layer_key(i, 'mlp.up')] = t[h + 'mlp.c_fc.weight']
    p[layer_key(i, 'mlp.up_bias')] = t[h + 'mlp.c_fc.bias']
    p[layer_key(i, 'mlp.down')] = t[h + 'mlp.c_proj.weight']
    p[layer_key(i, 'mlp.down_bias')] = t[h + 'mlp.c_proj.bias']
    for ours, theirs in (('norm1', 'ln_1'), ('norm2', 'ln_2')):
      p[layer_key(i, f'{ours}.scale')] = t[h + f'{theirs}.weight']
      p[layer_key(i, f'{ours}.bias')] = t[h + f'{theirs}.bias']
  return p


def mismatches(cfg: ModelConfig) -> list[str]:
  reasons = expect(cfg, kind='decoder', positions='learned', norm='layernorm',
                   norm_placement='pre', use_bias=True, embed_dim=0, head_transform=False,
                   output_bias=False, type_vocab_size=0, pooler=False)
  if cfg.mlp not in ('gelu_tanh', 'gelu', 'relu'):
    reasons.append(f'model.mlp={cfg.mlp!r} (needs gelu_tanh, gelu or relu)')
  return reasons


def from_native(p: Mapping, cfg: ModelConfig, s: Shape, base: Mapping) -> tuple[dict, dict]:
  d, hd = s.hidden, s.head_dim
  pre = 'transformer.'
  t = {pre + 'wte.weight': p['embed.tokens'], pre + 'wpe.weight': p['embed.positions'],
       pre + 'ln_f.weight': p['head.final_norm.scale'],
       pre + 'ln_f.bias': p['head.final_norm.bias']}
  if not cfg.tie_embeddings:
    t['lm_head.weight'] = p['head.out'].T
  for i in range(s.num_layers):
    h = f'{pre}h.{i}.'
    t[h + 'attn.c_attn.weight'] = np.concatenate(
        [p[layer_key(i, f'attn.{x}')].reshape(d, s.heads * hd) for x in 'qkv'], axis=1)
    t[h + 'attn.c_attn.bias'] = np.concatenate(
        [p[layer_key(i, f'attn.{x}_bias')].reshape(-1) for x in 'qkv'])
    t[h + 'attn.c_proj.weight'] = p[layer_key(i, 'attn.o')].reshape(s.heads * hd, d)
    t[h + 'attn.c_proj.bias'] = p[layer_key(i, 'attn.o_bias')]
    t[h + 'mlp.c_fc.weight'] = p[layer_key(i, 'mlp.up')]
    t[h + 'mlp.c_fc.bias'] = p[layer_key(i, 'mlp.up_bias')]
    t[h + 'mlp.c_proj.weight'] = p[layer_key(i, 'mlp.down')]
    t[h + 'mlp.c_proj.bias'] = p[layer_key(i, 'mlp.down_bias')]
    for ours, theirs in (('norm1', 'ln_1'), ('norm2', 'ln_2')):
      t[h + f'{theirs}.weight'] = p[layer_key(i, f'{ours}.scale')]
      t[h + f'{theirs}.bias'] = p[layer_key(i, f'{ours}.bias')]
  act = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu', 'relu': 'relu'}[cfg.mlp]
  keep = {k: base[k] for k in ('bos_token_id', 'eos_token_id', 'attn_pdrop', 'embd_pdrop',
                               'resid_pdrop') if k in base}
  config = {
      **keep,
      'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'],
      'vocab_size': cfg.vocab_size, 'n_embd': d, 'n_head': s.heads, 'n_layer': s.num_layers,
      'n_inner': s.ffn, 'n_positions': cfg.max_len, 'layer_norm_epsilon': cfg.norm_eps,
      'activation_function': act, 'tie_word_embeddings': cfg.tie_embeddings,
      'initializer_range': cfg.init_std, 'scale_attn_weights': True,
      'dtype': 'float32',
  }
  return config, t
