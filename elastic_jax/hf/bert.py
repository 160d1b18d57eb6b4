"""BERT checkpoints (e.g. all-MiniLM-L6-v2): post-norm LayerNorm, exact GELU, learned absolute
positions, token types, embedding LayerNorm; optionally the pooler (dense + tanh on [CLS]) and
the masked-LM head (dense -> GELU -> LayerNorm -> tied decoder + bias).

Exports are written as `BertForMaskedLM` with the pooler's weights beside it, so that
`AutoModelForMaskedLM` (MLM head) and `AutoModel` (encoder and pooler) both load them exactly.
The next-sentence head (`cls.seq_relationship`) is not part of the model and is dropped.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from elastic_jax.config import ModelConfig
from elastic_jax.hf.family import expect, first, prefix, refuse, require
from elastic_jax.hf.layout import Shape, layer_key

MODEL_TYPES = ('bert',)
_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                'relu': 'relu'}
MLM_HEAD = 'cls.predictions.transform.dense.weight'


def _ln(t: Mapping, base: str) -> tuple[str, str]:
  """A LayerNorm's weight and bias names (old checkpoints call them gamma and beta)."""
  return first(t, base + '.weight', base + '.gamma'), first(t, base + '.bias', base + '.beta')


def model_config(hf: Mapping, names: Collection[str] = ()) -> tuple[dict, Shape]:
  act = require(hf, 'hidden_act', tuple(_ACTIVATIONS), 'gelu')
  require(hf, 'position_embedding_type', ('absolute',), 'absolute')
  if hf.get('is_decoder') or hf.get('add_cross_attention'):
    raise refuse(hf, 'is_decoder', True, 'only the BERT encoder is supported')
  hidden, heads = int(hf['hidden_size']), int(hf['num_attention_heads'])
  if hidden % heads:
    raise refuse(hf, 'num_attention_heads', heads, f'must divide hidden_size={hidden}')
  shape = Shape(hidden=hidden, heads=heads, kv_groups=heads, head_dim=hidden // heads,
                ffn=int(hf['intermediate_size']), num_layers=int(hf['num_hidden_layers']))
  has_pooler = any(n.endswith('pooler.dense.weight') for n in names)
  cfg = dict(kind='encoder', vocab_size=int(hf['vocab_size']),
             max_len=int(hf.get('max_position_embeddings', 512)), positions='learned',
             norm='layernorm', norm_placement='post', norm_eps=float(hf.get('layer_norm_eps',
                                                                            1e-12)),
             mlp=_ACTIVATIONS[act], tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
             use_bias=True, output_bias=True, head_transform=True,
             type_vocab_size=int(hf.get('type_vocab_size', 2)), pooler=has_pooler,
             init_std=float(hf.get('initializer_range', 0.02)))
  return cfg, shape


def to_native(t: Mapping, hf: Mapping, s: Shape) -> dict[str, np.ndarray]:
  """The encoder, pooler and MLM head as present in the checkpoint (a missing head is left out:
  the importer initialises it and says so)."""
  pre = prefix(t, 'embeddings.word_embeddings.weight', ('bert.', ''))
  d, n, hd = s.hidden, s.heads, s.head_dim
  e = pre + 'embeddings.'
  w, b = _ln(t, e + 'LayerNorm')
  p = {'embed.tokens': t[e + 'word_embeddings.weight'],
       'embed.positions': t[e + 'position_embeddings.weight'],
       'embed.norm.scale': t[w], 'embed.norm.bias': t[b]}
  if hf.get('type_vocab_size', 2):
    p['embed.types'] = t[e + 'token_type_embeddings.weight']
  for i in range(s.num_layers):
    lay = f'{pre}encoder.layer.{i}.'
    for ours, theirs in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      p[layer_key(i, f'attn.{ours}')] = (
          t[lay + f'attention.self.{theirs}.weight'].T.reshape(d, n, hd))
      p[layer_key(i, f'attn.{ours}_bias')] = t[lay + f'attention.self.{theirs}.bias'].reshape(n, hd)
    p[layer_key(i, 'attn.o')] = t[lay + 'attention.output.dense.weight'].T.reshape(n, hd, d)
    p[layer_key(i, 'attn.o_bias')] = t[lay + 'attention.output.dense.bias']
    p[layer_key(i, 'mlp.up')] = t[lay + 'intermediate.dense.weight'].T
    p[layer_key(i, 'mlp.up_bias')] = t[lay + 'intermediate.dense.bias']
    p[layer_key(i, 'mlp.down')] = t[lay + 'output.dense.weight'].T
    p[layer_key(i, 'mlp.down_bias')] = t[lay + 'output.dense.bias']
    for ours, theirs in (('norm1', 'attention.output.LayerNorm'), ('norm2', 'output.LayerNorm')):
      w, b = _ln(t, lay + theirs)
      p[layer_key(i, f'{ours}.scale')], p[layer_key(i, f'{ours}.bias')] = t[w], t[b]
  if pre + 'pooler.dense.weight' in t:
    p['pooler.kernel'] = t[pre + 'pooler.dense.weight'].T
    p['pooler.bias'] = t[pre + 'pooler.dense.bias']
  if MLM_HEAD in t:
    c = 'cls.predictions.'
    p['head.transform'] = t[c + 'transform.dense.weight'].T
    p['head.transform_bias'] = t[c + 'transform.dense.bias']
    w, b = _ln(t, c + 'transform.LayerNorm')
    p['head.transform_norm.scale'], p['head.transform_norm.bias'] = t[w], t[b]
    p['head.out_bias'] = t[first(t, c + 'bias', c + 'decoder.bias')]
    if not hf.get('tie_word_embeddings', True):
      p['head.out'] = t[c + 'decoder.weight'].T
  return p


def mismatches(cfg: ModelConfig) -> list[str]:
  reasons = expect(cfg, kind='encoder', positions='learned', norm='layernorm',
                   norm_placement='post', use_bias=True, embed_dim=0, head_transform=True,
                   output_bias=True)
  if cfg.mlp not in _ACTIVATIONS.values():
    reasons.append(f'model.mlp={cfg.mlp!r} (needs gelu, gelu_tanh or relu)')
  return reasons


def from_native(p: Mapping, cfg: ModelConfig, s: Shape, base: Mapping) -> tuple[dict, dict]:
  d, hd = s.hidden, s.head_dim
  e = 'bert.embeddings.'
  t = {e + 'word_embeddings.weight': p['embed.tokens'],
       e + 'position_embeddings.weight': p['embed.positions'],
       e + 'LayerNorm.weight': p['embed.norm.scale'], e + 'LayerNorm.bias': p['embed.norm.bias'],
       # A model without token types is written with one all-zero type (adds nothing).
       e + 'token_type_embeddings.weight': p.get('embed.types', np.zeros((1, d), np.float32))}
  for i in range(s.num_layers):
    lay = f'bert.encoder.layer.{i}.'
    for ours, theirs in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      t[lay + f'attention.self.{theirs}.weight'] = (
          p[layer_key(i, f'attn.{ours}')].reshape(d, s.heads * hd).T)
      t[lay + f'attention.self.{theirs}.bias'] = p[layer_key(i, f'attn.{ours}_bias')].reshape(-1)
    t[lay + 'attention.output.dense.weight'] = p[layer_key(i, 'attn.o')].reshape(-1, d).T
    t[lay + 'attention.output.dense.bias'] = p[layer_key(i, 'attn.o_bias')]
    t[lay + 'intermediate.dense.weight'] = p[layer_key(i, 'mlp.up')].T
    t[lay + 'intermediate.dense.bias'] = p[layer_key(i, 'mlp.up_bias')]
    t[lay + 'output.dense.weight'] = p[layer_key(i, 'mlp.down')].T
    t[lay + 'output.dense.bias'] = p[layer_key(i, 'mlp.down_bias')]
    for ours, theirs in (('norm1', 'attention.output.LayerNorm'), ('norm2', 'output.LayerNorm')):
      t[lay + f'{theirs}.weight'] = p[layer_key(i, f'{ours}.scale')]
      t[lay + f'{theirs}.bias'] = p[layer_key(i, f'{ours}.bias')]
  if cfg.pooler:
    t['bert.pooler.dense.weight'] = p['pooler.kernel'].T
    t['bert.pooler.dense.bias'] = p['pooler.bias']
  c = 'cls.predictions.'
  t[c + 'transform.dense.weight'] = p['head.transform'].T
  t[c + 'transform.dense.bias'] = p['head.transform_bias']
  t[c + 'transform.LayerNorm.weight'] = p['head.transform_norm.scale']
  t[c + 'transform.LayerNorm.bias'] = p['head.transform_norm.bias']
  t[c + 'bias'] = p['head.out_bias']
  if not cfg.tie_embeddings:
    t[c + 'decoder.weight'] = p['head.out'].T
  act = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu'}[cfg.mlp]
  keep = {k: base[k] for k in ('pad_token_id', 'hidden_dropout_prob',
                               'attention_probs_dropout_prob', 'classifier_dropout') if k in base}
  config = {
      **keep,
      'model_type': 'bert', 'architectures': ['BertForMaskedLM'],
      'vocab_size': cfg.vocab_size, 'hidden_size': d, 'num_hidden_layers': s.num_layers,
      'num_attention_heads': s.heads, 'intermediate_size': s.ffn, 'hidden_act': act,
      'max_position_embeddings': cfg.max_len, 'type_vocab_size': max(cfg.type_vocab_size, 1),
      'layer_norm_eps': cfg.norm_eps, 'position_embedding_type': 'absolute',
      'tie_word_embeddings': cfg.tie_embeddings, 'initializer_range': cfg.init_std,
      'dtype': 'float32',
  }
  return config, t
