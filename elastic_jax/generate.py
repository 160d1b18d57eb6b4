"""Text generation from exported decoders with a KV cache: `elastic-jax generate`.

A prompt batch is left-padded to a length bucket (a power of two, at least 16), so one compiled
prefill serves every prompt of that bucket; the cache holds bucket + max_new_tokens slots per
layer, preallocated, and one compiled decode step (per bucket) appends one token to every row.
Padding slots are masked out of attention and positions count from each row's first real token,
so a padded row computes what the unpadded prompt would. Models: native exports
(`elastic-jax export`) and Hugging Face directories (through `elastic_jax.hf.convert`).

A SCONE sub-network (elastic_jax/scone) decodes with its f-gram table on the host: before each
compiled call the host looks up the longest f-gram ending at each new position (in the row's
own tokens, never the padding) and sends only the gathered rows [B, T, hidden] and their ids.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elastic_jax.errors import UserError
from elastic_jax.model.layers import Attention, KVCache
from elastic_jax.model.supernet import Model

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn: temperature 0 is greedy; otherwise softmax(logits / T)
  restricted to the `top_k` most likely tokens (0 = all) and to the smallest set whose
  probability reaches `top_p` (1 = all)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not 0 <= self.temperature < float('inf'):
      raise UserError(f'--temperature={self.temperature} must be a finite number >= 0 '
                      '(0 = greedy)')
    if self.top_k < 0:
      raise UserError(f'--top_k={self.top_k} must be >= 0 (0 = no top-k filter)')
    if not 0 < self.top_p <= 1:
      raise UserError(f'--top_p={self.top_p} must be in (0, 1] (1 = no nucleus filter)')


def filter_logits(logits_BV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Logits with every token outside the top-k / top-p sets set to -inf (ties at the threshold
  are kept)."""
  neg_inf = jnp.asarray(-jnp.inf, logits_BV.dtype)
  if top_k and top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  if top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # probability of the better tokens
    # The smallest prefix reaching top_p: a token is kept while those before it fall short.
    kept_BV = before_BV < top_p
    threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, neg_inf, logits_BV)
  return logits_BV


def sample(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token ids [B] (int32)."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def bucket(length: int) -> int:
  """The padded prompt length: the next power of two, at least MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def _attentions(model: Model) -> list[Attention]:
  return [m for _, m in model.iter_modules() if isinstance(m, Attention)]


def _prefill(graphdef, slots: int, sampling: Sampling, params, cache, tokens_BP, pad_B, key,
             fgram=None):
  """Runs the left-padded prompts through the model, filling cache slots [0, P). `fgram`: a
  SCONE model's gathered table rows {'fgram_ids' [B, P], 'fgram_emb' [B, P, hidden]}, or None."""
  model = nnx.merge(graphdef, params, cache)
  p = tokens_BP.shape[1]
  positions_BP = jnp.maximum(jnp.arange(p)[None] - pad_B[:, None], 0)
  s_S = jnp.arange(slots)
  # Query t sees slots s with pad <= s <= t (its own real prefix; later slots are empty).
  mask_BPS = (s_S[None, None] >= pad_B[:, None, None]) & (s_S[None, None] <= jnp.arange(p)[:, None])
  logits_BV = model.last_logits({'tokens': tokens_BP, 'positions': positions_BP,
                                 'attn_mask': mask_BPS, **(fgram or {})})
  return sample(logits_BV, key, sampling), nnx.state(model, nnx.Cache)


def _decode_step(graphdef, slots: int, sampling: Sampling, params, cache, token_B, slot, pad_B,
                 key, fgram=None):
  """Appends `token_B` at cache slot `slot` and draws the next token (`fgram`: its table rows,
  {'fgram_ids' [B, 1], 'fgram_emb' [B, 1, hidden]}, or None)."""
  model = nnx.merge(graphdef, params, cache)
  s_S = jnp.arange(slots)
  mask_B1S = ((s_S[None] >= pad_B[:, None]) & (s_S[None] <= slot))[:, None]
  logits_BV = model.last_logits({'tokens': token_B[:, None], 'positions': (slot - pad_B)[:, None],
                                 'attn_mask': mask_B1S, **(fgram or {})})
  return sample(logits_BV, key, sampling), nnx.state(model, nnx.Cache)


def _fgram_rows(table, tokens_BS: np.ndarray, pad_B: np.ndarray, lo: int, hi: int) -> dict:
  """The table rows of slots [lo, hi) of the left-padded rows `tokens_BS` (filled up to hi):
  the host lookup sees the K - 1 slots before `lo` too, and positions from each row's first
  real token, so no match reaches into the padding."""
  start = max(0, lo - (table.fgrams.max_n - 1))
  slots = np.arange(start, hi)
  positions = slots[None] - pad_B[:, None]
  batch = table({'tokens': tokens_BS[:, start:hi], 'positions': np.maximum(positions, 0),
                 'segment_ids': (positions >= 0).astype(np.int32)})
  return {'fgram_ids': jnp.asarray(batch['fgram_ids'][:, lo - start:]),
          'fgram_emb': jnp.asarray(batch['fgram_emb'][:, lo - start:])}


@dataclasses.dataclass
class Generation:
  """Generated ids per prompt (prompt excluded, stopped after eos) and speeds."""

  tokens: list[list[int]]
  prompt_tokens: int  # real (unpadded) prompt tokens, all rows
  bucket: int
  compile_s: float  # compiling prefill and decode step for this bucket (0 when cached)
  prefill_s: float
  decode_s: float
  decode_steps: int  # decode steps run (each appends one token to every row)

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_s

  @property
  def decode_tokens_per_s(self) -> float:
    """Tokens per second of each row (a batch of B rows makes B times as many in all)."""
    return self.decode_steps / self.decode_s if self.decode_steps else float('nan')

  def summary(self) -> dict:
    return {'bucket': self.bucket, 'prompt_tokens': self.prompt_tokens,
            'new_tokens': sum(len(t) for t in self.tokens), 'compile_s': round(self.compile_s, 3),
            'prefill_s': round(self.prefill_s, 4), 'decode_s': round(self.decode_s, 4),
            'prefill_tokens_per_s': round(self.prefill_tokens_per_s, 1),
            'decode_tokens_per_s': round(self.decode_tokens_per_s, 2)}


class Generator:
  """Compiled KV-cache decoding of one dense decoder; compiles once per (batch, bucket, new
  tokens, sampling) and reuses the programs. `table`: an exported SCONE sub-network's f-gram
  table (`scone.table.load_for_export`), looked up on the host."""

  def __init__(self, model: Model, table=None):
    if model.cfg.kind != 'decoder':
      raise UserError('generation needs a decoder (causal) model; this one is an encoder '
                      '(fine-tune it with `elastic-jax finetune` instead)')
    if table is not None and table.rows_SD.shape[1] != model.dims.hidden:
      raise UserError(f'the SCONE table has rows of width {table.rows_SD.shape[1]}, the model '
                      f'hidden {model.dims.hidden}: it belongs to another sub-network')
    self.model = model
    self.table = table
    self.params = nnx.state(model, nnx.Param)
    self._programs: dict[tuple, tuple] = {}
    self.compiles = 0

  def _compiled(self, b: int, p: int, new: int, sampling: Sampling):
    key = (b, p, new, sampling)
    if key in self._programs:
      return self._programs[key], 0.0
    start = time.perf_counter()
    dtype = jnp.dtype(self.model.cfg.dtype)
    attentions = _attentions(self.model)
    for attn in attentions:
      attn.kv_cache = KVCache(b, p + new, attn.kv_groups, attn.head_dim, dtype)
    try:
      graphdef, _, cache = nnx.split(self.model, nnx.Param, nnx.Cache)
    finally:
      for attn in attentions:
        attn.kv_cache = None
    rng = jax.random.key(0)
    pad = jnp.zeros((b,), jnp.int32)
    static = (graphdef, p + new, sampling)
    fgram = lambda t: None if self.table is None else {
        'fgram_ids': jnp.zeros((b, t), jnp.int32),
        'fgram_emb': jnp.zeros((b, t, self.model.dims.hidden), jnp.float32)}
    prefill = jax.jit(_prefill, static_argnums=(0, 1, 2), donate_argnums=(4,)).lower(
        *static, self.params, cache, jnp.zeros((b, p), jnp.int32), pad, rng, fgram(p)).compile()
    step = jax.jit(_decode_step, static_argnums=(0, 1, 2), donate_argnums=(4,)).lower(
        *static, self.params, cache, pad, jnp.int32(p), pad, rng, fgram(1)).compile()
    self._programs[key] = (prefill, step, cache)
    self.compiles += 1
    return self._programs[key], time.perf_counter() - start

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               sampling: Sampling = Sampling(), seed: int = 0,
               eos_id: int | None = None) -> Generation:
    """Continues each prompt (a list of token ids) by up to `max_new_tokens` tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise UserError('every prompt needs at least one token')
    if max_new_tokens < 1:
      raise UserError(f'--max_new_tokens={max_new_tokens} must be >= 1')
    vocab = self.model.cfg.vocab_size
    if any(not 0 <= t < vocab for prompt in prompts for t in prompt):
      raise UserError(f'a prompt token id is outside the model vocabulary [0, {vocab}); is the '
                      'tokenizer the one this model was trained with?')
    longest = max(len(p) for p in prompts)
    max_len = self.model.cfg.max_len
    if longest + max_new_tokens > max_len:
      raise UserError(f'the prompt ({longest} tokens) plus --max_new_tokens={max_new_tokens} '
                      f'exceeds the model\'s {max_len} positions; shorten the prompt or generate '
                      'fewer tokens')
    b, p = len(prompts), bucket(longest)
    (prefill, step, cache_zeros), compile_s = self._compiled(b, p, max_new_tokens, sampling)
    tokens_BP = np.zeros((b, p), np.int32)
    for i, prompt in enumerate(prompts):
      tokens_BP[i, p - len(prompt):] = prompt
    pad_np = np.asarray([p - len(q) for q in prompts], np.int32)
    pad_B = jnp.asarray(pad_np)
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    cache = jax.tree.map(jnp.zeros_like, cache_zeros)  # donated below: a fresh copy each call
    # A SCONE model's host lookup reads every token so far: the prompt, then each new token.
    seq_BS = np.concatenate([tokens_BP, np.zeros((b, max_new_tokens), np.int32)], axis=1)
    rows = lambda lo, hi: None if self.table is None else _fgram_rows(self.table, seq_BS,
                                                                      pad_np, lo, hi)

    start = time.perf_counter()
    token_B, cache = prefill(self.params, cache, jnp.asarray(tokens_BP), pad_B, keys[0],
                             rows(0, p))
    out = [np.asarray(token_B)]
    prefill_s = time.perf_counter() - start
    done_B = np.zeros(b, bool) if eos_id is None else out[0] == eos_id
    start = time.perf_counter()
    for i in range(1, max_new_tokens):
      if done_B.all():
        break
      slot = p + i - 1
      seq_BS[:, slot] = out[-1]
      token_B, cache = step(self.params, cache, token_B, jnp.int32(slot), pad_B, keys[i],
                            rows(slot, slot + 1))
      out.append(np.asarray(token_B))
      if eos_id is not None:
        done_B |= out[-1] == eos_id
    decode_s = time.perf_counter() - start

    ids_BN = np.stack(out, axis=1)
    rows = []
    for row in ids_BN.tolist():
      if eos_id is not None and eos_id in row:
        row = row[:row.index(eos_id) + 1]
      rows.append(row)
    return Generation(tokens=rows, prompt_tokens=sum(len(q) for q in prompts), bucket=p,
                      compile_s=compile_s, prefill_s=prefill_s, decode_s=decode_s,
                      decode_steps=len(out) - 1)


def greedy_reference(model: Model, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
  """Greedy decoding without a cache: the whole sequence through the model for every new token
  (the definition the cached decoder must reproduce; slow, for tests). The sequence is
  right-padded to its final length, which a causal model's earlier positions never see, so one
  compiled forward serves every step."""
  ids = np.zeros((1, len(prompt) + max_new_tokens), np.int32)
  ids[0, :len(prompt)] = prompt
  forward = jax.jit(lambda tokens: model({'tokens': tokens})[0])
  for n in range(len(prompt), ids.shape[1]):
    ids[0, n] = int(jnp.argmax(forward(jnp.asarray(ids))[n - 1]))
  return ids[0, len(prompt):].tolist()


def decode_latency(model: Model, *, prompt_tokens: int = 32, new_tokens: int = 16,
                   repeats: int = 3) -> dict:
  """What one user waits for on this device: milliseconds to prefill a `prompt_tokens` prompt
  (batch 1, greedy, up to its first new token) and milliseconds per further token; medians of
  `repeats` runs after one compile-and-warm-up run. The prompt shrinks to fit the model's
  positions (it is a fixed id pattern: latency does not depend on the ids)."""
  new_tokens = max(2, min(new_tokens, model.cfg.max_len // 2))
  prompt_tokens = max(1, min(prompt_tokens, model.cfg.max_len - new_tokens))
  prompt = (np.arange(prompt_tokens) % model.cfg.vocab_size).tolist()
  generator = Generator(model)
  first = generator.generate([prompt], new_tokens)
  runs = [generator.generate([prompt], new_tokens) for _ in range(repeats)]
  return {'prefill_ms': round(1e3 * float(np.median([r.prefill_s for r in runs])), 4),
          'per_token_ms': round(1e3 * float(np.median([r.decode_s / r.decode_steps
                                                       for r in runs])), 4),
          'prompt_tokens': prompt_tokens, 'new_tokens': new_tokens,
          'compile_s': round(first.compile_s, 3)}
