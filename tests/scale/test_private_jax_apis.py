"""The private JAX APIs the project uses still have the shape it relies on.

`aot.unrolled_scans` monkeypatches `jax._src.lax.control_flow.loops.scan`, and
`distributed._cluster_detected` reads `jax._src.clusters`; both would otherwise break silently
(wrong FLOP counts, or a cluster never detected) on a JAX upgrade.
"""

import inspect

import jax
import jax.numpy as jnp

from elastic_jax import aot, distributed


def _loops():
  from jax._src.lax.control_flow import loops
  return loops


def test_lax_scan_is_the_private_loops_scan_with_the_patched_signature():
  loops = _loops()
  assert jax.lax.scan is loops.scan
  params = list(inspect.signature(loops.scan).parameters)
  assert params == ['f', 'init', 'xs', 'length', 'reverse', 'unroll', '_split_transpose']


def _program():
  """A new function each call: JAX caches traces per function, and a trace made before the patch
  would be reused inside it."""
  def program(x):
    def body(c, v):
      return c * 1.5 + jnp.sin(v), c
    carry, _ = jax.lax.scan(body, x[0], x)
    return carry + jnp.sum(jax.lax.map(jnp.cos, x))
  return program


def test_unrolled_scans_removes_the_loops_of_scan_and_map_and_restores_scan():
  x = jnp.arange(5.0)
  original = jax.lax.scan
  looped = jax.jit(_program()).lower(x).as_text()
  assert looped.count('stablehlo.while') == 2  # the scan and the map
  with aot.unrolled_scans():
    unrolled = jax.jit(_program()).lower(x).as_text()
  assert 'stablehlo.while' not in unrolled
  assert jax.lax.scan is original and _loops().scan is original
  # The patched trace computes the same function.
  with aot.unrolled_scans():
    got = jax.jit(_program())(x)
  assert jnp.allclose(got, _program()(x), rtol=1e-6)


def test_cluster_registry_has_the_attributes_distributed_reads():
  from jax._src import clusters
  envs = clusters.ClusterEnv._cluster_types
  assert len(envs) > 0
  for env in envs:
    assert callable(env.is_env_present)
    assert isinstance(env.opt_in_only_method, bool)
  assert distributed._cluster_detected() in (True, False)
