"""Sums over slices in one `lax.scan`: gradient accumulation over micro-batches (training) and over
slices of a minibatch (zero-cost proxies)."""

from __future__ import annotations

import jax


def scan_sum(fn, init, xs):
  """Runs `fn(x) -> (tree, out)` on each slice `x` of `xs`' leading axis in one scan: returns
  (`init` + the sum of the trees, the `out`s stacked with a leading slice axis). The carry keeps
  `init`'s structure and dtypes (float32 zeros accumulate lower-precision trees in float32);
  None leaves stay None."""
  def body(total, x):
    tree, out = fn(x)
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), total, tree), out
  return jax.lax.scan(body, init, xs)
