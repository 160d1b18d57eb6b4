"""KV-cache decoding: exactly the tokens of full-sequence greedy decoding on random exported
sub-networks (float32), batches with left padding, one compile per prompt-length bucket, the
samplers against NumPy, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from elastic_jax import arch as arch_lib
from elastic_jax import export
from elastic_jax import generate as gen
from elastic_jax.cli import main
from elastic_jax.config import ModelConfig, check_compatible, space_config
from elastic_jax.errors import UserError
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

DECODERS = {
    'gpt2': dict(positions='learned', norm='layernorm', mlp='gelu_tanh'),
    'llama_gqa': dict(positions='rotary', norm='rmsnorm', mlp='swiglu', use_bias=False),
    'qwen2_qkv_bias': dict(positions='rotary', norm='rmsnorm', mlp='swiglu', use_bias=False,
                           qkv_bias=True, tie_embeddings=False),
    'factor_post': dict(positions='rotary', norm='rmsnorm', norm_placement='post', mlp='gelu',
                        embed_dim=14),
    'untied_nopos': dict(positions='none', norm='layernorm', mlp='relu', tie_embeddings=False,
                         output_bias=True),
}
SPACE = dict(num_layers=3, hidden=[18, 26, 34], depth=[1, 2, 3],
             blocks=['transformer', 'bottleneck', 'skip'], heads=[2, 3, 6], kv_groups=[1, 2, 3],
             head_dim=[4, 6], ffn=[10, 22, 34], inner=[8, 14], bottleneck_head_dim=4)
VOCAB = 53


def supernet(family: str, seed: int):
  cfg = ModelConfig(kind='decoder', vocab_size=VOCAB, max_len=40, **DECODERS[family])
  space_cfg = space_config(SPACE)
  check_compatible(cfg, space_cfg)
  space = Space(cfg, space_cfg, seq_len=11)
  # Scale 1: peaked logits, so greedy choices are not near-ties that rounding could flip.
  model = randomize(Model(cfg, space_cfg.supernet_dims(), rngs=nnx.Rngs(seed)), seed + 1, 1.0)
  return space, model


def exported(n: int, seed: int = 0):
  """n random exported sub-networks, spread over the decoder families."""
  out = []
  families = list(DECODERS)
  for i in range(n):
    space, model = supernet(families[i % len(families)], seed + i)
    arch = arch_lib.unstack(space.sample(jax.random.key(seed + i), 1))[0]
    out.append(export.export(model, space.cfg, arch))
  return out


def _check_same_as_full_sequence(models, new: int = 7):
  rng = np.random.RandomState(0)
  for i, dense in enumerate(models):
    prompt = rng.randint(0, VOCAB, rng.randint(1, 14)).tolist()
    cached = gen.Generator(dense).generate([prompt], new).tokens[0]
    assert cached == gen.greedy_reference(dense, prompt, new), (i, dense.dims)


def test_cached_greedy_equals_full_sequence_greedy_quick():
  _check_same_as_full_sequence(exported(3, seed=100))


@pytest.mark.slow
def test_cached_greedy_equals_full_sequence_greedy_20_subnetworks():
  _check_same_as_full_sequence(exported(20))


def test_left_padded_batch_rows_equal_single_prompts_and_buckets_compile_once():
  (dense,) = exported(1, seed=7)[:1]
  g = gen.Generator(dense)
  prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7], [2]]
  together = g.generate(prompts, 6)
  assert g.compiles == 1 and together.bucket == 16
  again = g.generate([[7] * 12, [1] * 16, [4] * 2], 6)  # same bucket and batch: no compile
  assert g.compiles == 1 and again.compile_s == 0
  for prompt, row in zip(prompts, together.tokens):
    assert row == gen.greedy_reference(dense, prompt, 6)
  longer = g.generate([[5] * 17, [1] * 3, [2] * 4], 6)
  assert g.compiles == 2 and longer.bucket == 32
  assert longer.tokens[0] == gen.greedy_reference(dense, [5] * 17, 6)


def test_eos_stops_a_row():
  (dense,) = exported(1, seed=3)
  prompt = [1, 2, 3]
  ref = gen.greedy_reference(dense, prompt, 8)
  eos = ref[2]
  out = gen.Generator(dense).generate([prompt], 8, eos_id=eos).tokens[0]
  assert out == ref[:ref.index(eos) + 1]


def _filter_reference(logits, top_k, top_p):
  """NumPy: keep the top-k, then the smallest most-likely set with probability >= top_p."""
  out = logits.astype(np.float64).copy()
  for row in out:
    if top_k:
      row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
    if top_p < 1:
      order = np.argsort(-row, kind='stable')
      probs = np.exp(row[order] - row[order[0]])
      probs /= probs.sum()
      n_keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)  # first prefix reaching top_p
      row[row < row[order[min(n_keep, len(row)) - 1]]] = -np.inf
  return out


@pytest.mark.parametrize('top_k,top_p', [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.3), (0, 0.9),
                                         (7, 0.6)])
def test_filter_logits_equals_numpy(top_k, top_p):
  logits = np.random.RandomState(top_k).randn(4, 29).astype(np.float32) * 2
  ours = np.asarray(gen.filter_logits(jnp.asarray(logits), top_k, top_p))
  ref = _filter_reference(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
  np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)


def test_sampling_frequencies_follow_the_filtered_softmax():
  logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
  s = gen.Sampling(temperature=0.7, top_k=4, top_p=0.95)
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = np.asarray(jax.vmap(lambda k: gen.sample(logits, k, s))(keys))[:, 0]
  ref = _filter_reference(np.asarray(logits) / 0.7, 4, 0.95)[0]
  probs = np.exp(ref - ref.max())
  probs /= probs.sum()
  freq = np.bincount(draws, minlength=6) / len(draws)
  assert np.all(freq[probs == 0] == 0)
  np.testing.assert_allclose(freq, probs, atol=0.015)  # ~4 standard errors at n = 20,000
  greedy = gen.sample(logits, jax.random.key(1), gen.Sampling(temperature=1.0, top_k=1))
  assert int(greedy[0]) == 0


def test_bad_input(tmp_path, capsys):
  (dense,) = exported(1, seed=5)
  g = gen.Generator(dense)
  with pytest.raises(UserError, match='positions'):
    g.generate([[1] * 30], 20)  # max_len 40
  with pytest.raises(UserError, match='at least one token'):
    g.generate([[]], 3)
  with pytest.raises(UserError, match='vocabulary'):
    g.generate([[VOCAB]], 3)
  with pytest.raises(UserError, match='top_p'):
    gen.Sampling(temperature=1.0, top_p=0.0)
  for t in (float('inf'), float('nan'), -1.0):  # inf was taken (uniform sampling, silently)
    with pytest.raises(UserError, match='temperature.*must be a finite number >= 0'):
      gen.Sampling(temperature=t)
  encoder = Model(ModelConfig(kind='encoder', vocab_size=VOCAB), dense.dims, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match='decoder'):
    gen.Generator(encoder)
  # CLI: a model without a tokenizer, a missing directory -> one line, exit 2.
  export.save(dense, tmp_path / 'm')
  assert main(['elastic-jax', 'generate', f'--model={tmp_path / "m"}', '--prompt=hi']) == 2
  assert 'no tokenizer.json' in capsys.readouterr().err
  assert main(['elastic-jax', 'generate', f'--model={tmp_path / "nope"}', '--prompt=hi']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'config.json' in err


def test_decode_latency_is_the_median_prefill_and_per_token_time(monkeypatch):
  """With a clock that ticks 1 ms per reading, every timed span is one tick: prefill 1 ms, and
  the decode loop's one span over new - 1 steps. The prompt shrinks to fit max_len 40."""
  (dense,) = exported(1, seed=5)
  ticks = iter(range(10**6))
  monkeypatch.setattr(gen.time, 'perf_counter', lambda: next(ticks) * 1e-3)
  got = gen.decode_latency(dense, prompt_tokens=64, new_tokens=9, repeats=3)
  assert got['prompt_tokens'] == 40 - 9 and got['new_tokens'] == 9
  assert got['prefill_ms'] == pytest.approx(1.0)
  assert got['per_token_ms'] == pytest.approx(1.0 / 8)
  assert got['compile_s'] == pytest.approx(1e-3)  # compiled once, in the warm-up run
  with pytest.raises(UserError, match='decoder'):
    encoder = Model(ModelConfig(kind='encoder', vocab_size=VOCAB), dense.dims, rngs=nnx.Rngs(0))
    gen.decode_latency(encoder)
