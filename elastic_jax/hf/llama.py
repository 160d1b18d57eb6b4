"""Llama-family checkpoints (Llama, Mistral, Qwen2, SmolLM2): RMSNorm, SwiGLU, grouped-query
attention, rotary positions.

Rotary layout: Hugging Face rotates *halves* of each head (feature i pairs with i + d/2, both at
frequency i); elastic_jax rotates *interleaved pairs* (2i, 2i+1) at frequency i, so a prefix of a
head is a head of its own. Importing permutes the output features of every head of q and k (and
their biases) from one layout to the other; q.k is unchanged because both sides move together.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from elastic_jax.config import ModelConfig
from elastic_jax.hf.family import expect, first, prefix, refuse, require
from elastic_jax.hf.layout import Shape, layer_key

MODEL_TYPES = ('llama', 'mistral', 'qwen2')
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                 'qwen2': 'Qwen2ForCausalLM'}


def interleave_permutation(head_dim: int) -> np.ndarray:
  """perm with interleaved[..., j] = rotate_half_layout[..., perm[j]]."""
  perm = np.empty(head_dim, np.int64)
  perm[0::2] = np.arange(head_dim // 2)
  perm[1::2] = np.arange(head_dim // 2) + head_dim // 2
  return perm


def _rope(hf: Mapping) -> float:
  """rope_theta, refusing any scaled RoPE (transformers 4.x `rope_scaling` / 5.x
  `rope_parameters`)."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  kind = params.get('rope_type') or scaling.get('rope_type') or scaling.get('type') or 'default'
  if kind != 'default':
    raise refuse(hf, 'rope_scaling', kind, 'only unscaled RoPE (rope_type "default") is '
                 'reproduced exactly; scaled variants (linear, dynamic, yarn, llama3, ...) are not')
  return float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))


def model_config(hf: Mapping, names: Collection[str] = ()) -> tuple[dict, Shape]:
  mt = hf['model_type']
  require(hf, 'hidden_act', ('silu',), 'silu')
  if mt != 'qwen2':
    require(hf, 'attention_bias', (False,), False)
  require(hf, 'mlp_bias', (False,), False)
  theta = _rope(hf)
  max_len = int(hf.get('max_position_embeddings', 2048))
  if mt == 'qwen2' and hf.get('use_sliding_window'):
    raise refuse(hf, 'use_sliding_window', True, 'sliding-window attention is not implemented')
  window = hf.get('sliding_window') if mt != 'qwen2' else None
  if window:
    # Up to the window, sliding-window attention is full causal attention: import the model
    # with max_len = window so that longer sequences are refused instead of computed wrongly.
    max_len = min(max_len, int(window))
  hidden, heads = int(hf['hidden_size']), int(hf['num_attention_heads'])
  head_dim = int(hf.get('head_dim') or hidden // heads)
  if head_dim % 2:
    raise refuse(hf, 'head_dim', head_dim, 'rotary positions need an even head size')
  shape = Shape(hidden=hidden, heads=heads,
                kv_groups=int(hf.get('num_key_value_heads') or heads), head_dim=head_dim,
                ffn=int(hf['intermediate_size']), num_layers=int(hf['num_hidden_layers']))
  cfg = dict(kind='decoder', vocab_size=int(hf['vocab_size']), max_len=max_len,
             positions='rotary', rope_theta=theta, norm='rmsnorm', norm_placement='pre',
             norm_eps=float(hf.get('rms_norm_eps', 1e-6)), mlp='swiglu',
             tie_embeddings=bool(hf.get('tie_word_embeddings', False)), use_bias=False,
             qkv_bias=(mt == 'qwen2'), init_std=float(hf.get('initializer_range', 0.02)))
  return cfg, shape


def to_native(t: Mapping, hf: Mapping, s: Shape) -> dict[str, np.ndarray]:
  pre = prefix(t, 'embed_tokens.weight', ('model.', ''))
  perm = interleave_permutation(s.head_dim)
  d, hd = s.hidden, s.head_dim
  p = {'embed.tokens': t[pre + 'embed_tokens.weight'],
       'head.final_norm.scale': t[pre + 'norm.weight']}
  if not hf.get('tie_word_embeddings', False):
    p['head.out'] = t[first(t, 'lm_head.weight')].T
  for i in range(s.num_layers):
    a = f'{pre}layers.{i}.self_attn.'
    m = f'{pre}layers.{i}.mlp.'
    proj = lambda name, n, rotate, a=a: (
        t[a + name + '.weight'].reshape(n, hd, d)[:, perm if rotate else slice(None)]
        .transpose(2, 0, 1))
    p[layer_key(i, 'attn.q')] = proj('q_proj', s.heads, True)
    p[layer_key(i, 'attn.k')] = proj('k_proj', s.kv_groups, True)
    p[layer_key(i, 'attn.v')] = proj('v_proj', s.kv_groups, False)
    p[layer_key(i, 'attn.o')] = t[a + 'o_proj.weight'].T.reshape(s.heads, hd, d)
    if hf['model_type'] == 'qwen2':
      for name, n, rotate in (('q', s.heads, True), ('k', s.kv_groups, True),
                              ('v', s.kv_groups, False)):
        b = t[a + f'{name}_proj.bias'].reshape(n, hd)
        p[layer_key(i, f'attn.{name}_bias')] = b[:, perm] if rotate else b
    p[layer_key(i, 'mlp.gate')] = t[m + 'gate_proj.weight'].T
    p[layer_key(i, 'mlp.up')] = t[m + 'up_proj.weight'].T
    p[layer_key(i, 'mlp.down')] = t[m + 'down_proj.weight'].T
    p[layer_key(i, 'norm1.scale')] = t[f'{pre}layers.{i}.input_layernorm.weight']
    p[layer_key(i, 'norm2.scale')] = t[f'{pre}layers.{i}.post_attention_layernorm.weight']
  return p


def mismatches(cfg: ModelConfig) -> list[str]:
  return expect(cfg, kind='decoder', positions='rotary', norm='rmsnorm', norm_placement='pre',
                mlp='swiglu', use_bias=False, embed_dim=0, head_transform=False,
                output_bias=False, type_vocab_size=0, pooler=False)


def from_native(p: Mapping, cfg: ModelConfig, s: Shape, base: Mapping) -> tuple[dict, dict]:
  mt = base.get('model_type')  # the original's type, unless the family no longer matches it
  if mt not in MODEL_TYPES or (mt == 'qwen2') != cfg.qkv_bias:
    mt = 'qwen2' if cfg.qkv_bias else 'llama'
  inverse = np.argsort(interleave_permutation(s.head_dim))
  d, hd = s.hidden, s.head_dim
  pre = 'model.'
  t = {pre + 'embed_tokens.weight': p['embed.tokens'],
       pre + 'norm.weight': p['head.final_norm.scale']}
  if not cfg.tie_embeddings:
    t['lm_head.weight'] = p['head.out'].T
  for i in range(s.num_layers):
    a = f'{pre}layers.{i}.self_attn.'
    m = f'{pre}layers.{i}.mlp.'
    for name, n, rotate in (('q', s.heads, True), ('k', s.kv_groups, True),
                            ('v', s.kv_groups, False)):
      w = p[layer_key(i, f'attn.{name}')]  # [D, N, H]
      w = w[..., inverse] if rotate else w
      t[a + f'{name}_proj.weight'] = w.transpose(1, 2, 0).reshape(n * hd, d)
      if cfg.qkv_bias:
        b = p[layer_key(i, f'attn.{name}_bias')]
        t[a + f'{name}_proj.bias'] = (b[:, inverse] if rotate else b).reshape(n * hd)
    t[a + 'o_proj.weight'] = p[layer_key(i, 'attn.o')].reshape(s.heads * hd, d).T
    t[m + 'gate_proj.weight'] = p[layer_key(i, 'mlp.gate')].T
    t[m + 'up_proj.weight'] = p[layer_key(i, 'mlp.up')].T
    t[m + 'down_proj.weight'] = p[layer_key(i, 'mlp.down')].T
    t[f'{pre}layers.{i}.input_layernorm.weight'] = p[layer_key(i, 'norm1.scale')]
    t[f'{pre}layers.{i}.post_attention_layernorm.weight'] = p[layer_key(i, 'norm2.scale')]
  keep = {k: base[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id') if k in base}
  config = {
      **keep,
      'model_type': mt, 'architectures': [ARCHITECTURES[mt]],
      'vocab_size': cfg.vocab_size, 'hidden_size': d, 'intermediate_size': s.ffn,
      'num_hidden_layers': s.num_layers, 'num_attention_heads': s.heads,
      'num_key_value_heads': s.kv_groups, 'head_dim': hd, 'hidden_act': 'silu',
      'max_position_embeddings': cfg.max_len, 'rms_norm_eps': cfg.norm_eps,
      'rope_theta': cfg.rope_theta,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
      'tie_word_embeddings': cfg.tie_embeddings, 'initializer_range': cfg.init_std,
      'attention_bias': False, 'mlp_bias': False,
      'dtype': 'float32', 'use_cache': True,
  }
  if mt == 'mistral':
    config['sliding_window'] = None
  if mt == 'qwen2':
    config['use_sliding_window'] = False
  return config, t
