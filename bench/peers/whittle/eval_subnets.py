"""whittle's side of bench/bench_peers.py: sub-networks' validation loss, sliced in eager PyTorch.

Runs in whittle's own environment (bench/peers/whittle/.venv, from setup.sh), never imports
elastic_jax. Reads a JSON spec written by bench_peers.py:

  {"supernet": {litgpt Config fields}, "tokens": "x.npy" [B, T+1] int32,
   "archs": [{"n_embd": int, "n_layers": int, "heads": [int per layer], "ffn": [int per layer]}],
   "threads": [1, 2], "seed": 0}

For each thread count it sets `torch.set_num_threads`, then evaluates every architecture the way a
whittle search does (`GPT.set_sub_network`, a forward pass under `torch.inference_mode`, mean
cross-entropy of the next token) twice over: the first pass is what a search pays, the second is the
steady state. Writes JSON: per-thread seconds, per-arch losses and whittle's own parameter count of
each sub-network (`whittle.metrics.parameters.compute_parameters`).

  .venv/bin/python eval_subnets.py --spec spec.json --out out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import whittle
from litgpt import Config
from whittle.metrics.parameters import compute_parameters
from whittle.models.gpt import GPT


def select(model: GPT, a: dict) -> None:
  """The sub-network `a` (per-layer heads and FFN widths, MHA: query groups = heads)."""
  model.set_sub_network(sub_network_n_embd=a['n_embd'], sub_network_n_layers=a['n_layers'],
                        sub_network_num_heads=a['heads'], sub_network_query_groups=a['heads'],
                        sub_network_intermediate_size=a['ffn'])


def evaluate(model: GPT, archs: list[dict], inputs: torch.Tensor, targets: torch.Tensor,
             batch: int) -> tuple[list[float], float]:
  """Mean next-token loss of each arch and the seconds the loop took."""
  losses = []
  start = time.perf_counter()
  with torch.inference_mode():
    for a in archs:
      select(model, a)
      total, count = 0.0, 0
      for i in range(0, inputs.shape[0], batch):
        logits = model(inputs[i:i + batch])
        total += float(torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets[i:i + batch].flatten(), reduction='sum'))
        count += targets[i:i + batch].numel()
      losses.append(total / count)
  return losses, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--spec', required=True)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  with open(args.spec) as f:
    spec = json.load(f)
  torch.manual_seed(spec.get('seed', 0))
  config = Config(**spec['supernet'])
  model = GPT(config).eval()
  model.max_seq_length = config.block_size
  tokens = torch.from_numpy(np.load(spec['tokens']).astype(np.int64))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  batch = int(spec.get('batch', 8))
  archs = spec['archs']

  params = []
  for a in archs:
    select(model, a)
    params.append(int(compute_parameters(model)))
  model.reset_super_network()

  by_threads = {}
  losses = None
  for threads in spec['threads']:
    torch.set_num_threads(int(threads))
    losses, first = evaluate(model, archs, inputs, targets, batch)
    _, steady = evaluate(model, archs, inputs, targets, batch)
    by_threads[str(threads)] = {'first_pass_seconds': first, 'steady_seconds': steady}
    print(f'whittle, {threads} thread(s): {len(archs)} archs in {first:.2f}s first pass, '
          f'{steady:.2f}s steady', flush=True)
  out = {'by_threads': by_threads, 'losses': losses, 'params': params,
         'whittle': whittle.__version__ if hasattr(whittle, '__version__') else '0.6.0',
         'torch': torch.__version__, 'cpus': os.cpu_count(), 'python': platform.python_version(),
         'load_average': list(os.getloadavg())}
  tmp = args.out + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(out, f, indent=2)
  os.replace(tmp, args.out)


if __name__ == '__main__':
  main()
