"""The PCA count against a float64 SciPy reference, degenerate matrices included."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from conftest import REPO, xla_flags_with_devices

from elastic_jax.proxies import pca_count, pca_count_linear, pca_counts

ETAS = (0.5, 0.9, 0.99, 0.999)
MARGIN = 1e-5  # a cumulative ratio this close to eta is decided by float32 rounding
count = jax.jit(pca_count)  # eta traced: one compilation per shape


def reference(h_NxD, eta, w_N=None):
  """k from the singular values of the centred valid rows (float64), and the closest a cumulative
  ratio at k or k - 1 comes to eta."""
  h = np.asarray(h_NxD, np.float64)
  if w_N is not None:
    h = h[np.asarray(w_N) > 0]
  n, d = h.shape
  if n < 2:
    return 0, 1.0
  x = h - h.mean(axis=0)
  ev = scipy.linalg.svdvals(x) ** 2 / (n - 1)
  ev = np.sort(ev)[::-1]
  if ev[0] <= max(n, d) * np.finfo(np.float64).eps * max(np.abs(h).max(), 1e-300) ** 2:
    return 0, 1.0  # no variance (constant / zero columns) up to float64 rounding
  ev = np.where(ev > max(n, d) * np.finfo(np.float64).eps * ev[0], ev, 0.0)
  ratio = np.cumsum(ev) / ev.sum()
  k = int(np.argmax(ratio > eta)) + 1
  near = min(abs(ratio[k - 1] - eta), abs(ratio[k - 2] - eta) if k >= 2 else 1.0)
  return k, near


def matrices():
  """Named test matrices [N, D]: generic, decaying spectrum, rank-deficient, constant columns,
  fewer tokens than width, wider than 64, all-zero, all-constant, one row."""
  rng = np.random.default_rng(0)
  out = {}
  out['gaussian_41x13'] = rng.normal(size=(41, 13))
  scales = 0.7 ** np.arange(17)
  out['decaying_53x17'] = rng.normal(size=(53, 17)) * scales + 3.0
  out['rank3_37x19'] = rng.normal(size=(37, 3)) @ rng.normal(size=(3, 19))
  const = rng.normal(size=(29, 11)) * 0.5 ** np.arange(11)
  const[:, [2, 5]] = 0.1
  const[:, 7] = -7.3
  out['constant_cols_29x11'] = const
  out['wide_7x23'] = rng.normal(size=(7, 23)) * 0.8 ** np.arange(23)
  out['wide_rank2_9x31'] = rng.normal(size=(9, 2)) @ rng.normal(size=(2, 31))
  # Wider than 64, on the covariance and on the Gram side.
  out['tall_97x71'] = rng.normal(size=(97, 71)) * 0.93 ** np.arange(71)
  out['wide_rank40_67x89'] = (rng.normal(size=(67, 40)) * 0.9 ** np.arange(40)
                              @ rng.normal(size=(40, 89)))
  out['zeros_13x5'] = np.zeros((13, 5))
  out['all_constant_13x5'] = np.full((13, 5), 0.3)
  out['one_row_1x5'] = rng.normal(size=(1, 5))
  return out


@pytest.mark.parametrize('name', list(matrices()))
def test_pca_count_matches_float64_reference(name):
  h = matrices()[name].astype(np.float32)
  for eta in ETAS:
    k_ref, near = reference(h, eta)
    k = int(count(jnp.asarray(h), eta))
    if near > MARGIN:
      assert k == k_ref, (name, eta, k, k_ref)
    else:
      assert abs(k - k_ref) <= 1, (name, eta, k, k_ref)


def test_degenerate_cases():
  m = matrices()
  assert int(count(jnp.asarray(m['zeros_13x5'], jnp.float32), 0.99)) == 0
  assert int(count(jnp.asarray(m['all_constant_13x5'], jnp.float32), 0.99)) == 0
  assert int(count(jnp.asarray(m['one_row_1x5'], jnp.float32), 0.99)) == 0
  # Rank r data never needs more than r components; fewer tokens than width: at most N - 1.
  assert int(count(jnp.asarray(m['rank3_37x19'], jnp.float32), 0.999)) <= 3
  assert int(count(jnp.asarray(m['wide_7x23'], jnp.float32), 0.999)) <= 6


def test_zero_columns_add_no_variance():
  """A masked FFN appends exact-zero columns: the count must not move (including across the
  switch from the covariance to the Gram matrix when the padded width exceeds the tokens)."""
  m = matrices()
  for name, pad in (('decaying_53x17', 43), ('constant_cols_29x11', 4), ('wide_7x23', 4)):
    h = jnp.asarray(m[name], jnp.float32)
    padded = jnp.concatenate([h, jnp.zeros((h.shape[0], pad), jnp.float32)], axis=1)
    for eta in ETAS:
      assert int(count(padded, eta)) == int(count(h, eta)), (name, pad, eta)


def test_padding_rows_are_left_out():
  rng = np.random.default_rng(1)
  h = (rng.normal(size=(31, 9)) * 0.6 ** np.arange(9)).astype(np.float32)
  w = np.ones(31, np.float32)
  w[[0, 4, 5, 30]] = 0.0
  garbage = h.copy()
  garbage[w == 0] = 1e3 * rng.normal(size=(4, 9))
  for eta in ETAS:
    k = int(count(jnp.asarray(garbage), eta, jnp.asarray(w)))
    assert k == int(count(jnp.asarray(h[w > 0]), eta)), eta
    k_ref, near = reference(garbage, eta, w)
    assert k == k_ref or near <= MARGIN


def test_batched_counts_equal_single_counts():
  rng = np.random.default_rng(2)
  h = (rng.normal(size=(5, 23, 11)) * 0.7 ** np.arange(11)).astype(np.float32)
  h[3] = 0.0
  w = (rng.uniform(size=(5, 23)) > 0.2).astype(np.float32)
  batched = np.asarray(jax.jit(lambda a, b: pca_counts(a, 0.9, b))(h, w))
  single = [int(count(jnp.asarray(h[i]), 0.9, jnp.asarray(w[i]))) for i in range(5)]
  np.testing.assert_array_equal(batched, single)
  assert batched[3] == 0


def test_random_spectra_batch_matches_reference():
  """24 random matrices with random spectra and ranks, one batched call, against the reference."""
  rng = np.random.default_rng(3)
  hs, ws = [], []
  for i in range(24):
    rank = int(rng.integers(1, 17))
    h = rng.normal(size=(31, rank)) @ rng.normal(size=(rank, 17))
    h = h * rng.uniform(0.3, 1.0) ** np.arange(17) + rng.normal(size=17)
    hs.append(h)
    ws.append((rng.uniform(size=31) > 0.3 * (i % 2)).astype(np.float32))
  hs, ws = np.asarray(hs, np.float32), np.asarray(ws)
  for eta in (0.9, 0.99):
    got = np.asarray(jax.jit(pca_counts)(hs, eta, ws))
    for i in range(24):
      k_ref, near = reference(hs[i], eta, ws[i])
      assert got[i] == k_ref or (near <= MARGIN and abs(got[i] - k_ref) <= 1), (i, eta)


@pytest.mark.parametrize('factor_kernel', [False, True])
def test_linear_count_equals_count_of_the_product(factor_kernel):
  """W-PCA's path: the count of x @ kernel + bias from x's scatter matrix equals the count of the
  formed pre-activations, for full-rank, rank-deficient and padded inputs and for kernels with
  zeroed (masked) columns, by either factorisation (`factor_kernel`: the kernel's Gram matrix,
  falling back to the scatter matrix's for a rank-deficient kernel)."""
  rng = np.random.default_rng(4)
  cases = []
  x = rng.normal(size=(120, 16)) * 0.8 ** np.arange(16)
  cases.append((x, rng.normal(size=(16, 40)), None))
  low = rng.normal(size=(90, 4)) @ rng.normal(size=(4, 12))  # rank 4 input
  cases.append((low, rng.normal(size=(12, 30)), None))
  k = rng.normal(size=(16, 24)) * 0.9 ** np.arange(24)
  k[:, 17:] = 0.0  # a masked FFN: inactive columns are zero
  w = (rng.uniform(size=120) > 0.25).astype(np.float32)
  cases.append((x, k, w))
  cases.append((rng.normal(size=(10, 16)), rng.normal(size=(16, 8)), None))  # N < D
  k = rng.normal(size=(16, 24))
  k[:, 10:] = 0.0  # 10 active units of 24: K K^T has rank 10 < 16 (the fallback)
  cases.append((x, k, None))
  cases.append((x, np.zeros((16, 24)), None))  # no unit active: count 0
  bias = rng.normal(size=(64,))
  for x, k, w in cases:
    x, k = x.astype(np.float32), k.astype(np.float32)
    h = x @ k + bias[:k.shape[1]].astype(np.float32)
    wj = None if w is None else jnp.asarray(w)
    for eta in ETAS:
      got = int(jax.jit(pca_count_linear, static_argnames='factor_kernel')(
          jnp.asarray(x), jnp.asarray(k), eta, wj, factor_kernel=factor_kernel))
      k_ref, near = reference(np.asarray(h, np.float64), eta, w)
      assert got == k_ref or (near <= MARGIN and abs(got - k_ref) <= 1), (x.shape, eta, got, k_ref)


def test_both_eigenvalue_solvers_agree():
  """`descending_eigenvalues` picks singular values on CPU and eigvalsh elsewhere: on the
  reference matrices' scatter matrices both give the same spectrum to solver rounding."""
  from elastic_jax.proxies import pca
  for name, h in matrices().items():
    x = np.asarray(h, np.float64)
    x = x - x.mean(axis=0)
    m = jnp.asarray(x.T @ x, jnp.float32)
    a = np.asarray(pca._singular_values(m))
    b = np.asarray(pca._eigvalsh_descending(m))
    scale = max(float(a[0]), 1e-30)
    np.testing.assert_allclose(a / scale, np.maximum(b, 0) / scale, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(np.asarray(pca.descending_eigenvalues(m)), a)  # CPU: SVD


MESH_SCRIPT = textwrap.dedent('''
  import json, re
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec
  from elastic_jax import parallel
  from elastic_jax.proxies import pca_count_linear
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(120, 16)) * 0.8 ** np.arange(16)).astype(np.float32)
  k = rng.normal(size=(16, 40)).astype(np.float32)
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  rep = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec()))
  run = jax.jit(parallel.on_mesh(pca_count_linear, mesh), static_argnums=2)
  counts = [int(run(rep(x), rep(k), eta)) for eta in (0.5, 0.9, 0.99)]
  text = run.lower(rep(x), rep(k), 0.9).compile().as_text()
  dots = sorted({m for m in re.findall(r'= f32\\[([\\d,]+)\\][^ ]* dot\\(', text)})
  print(json.dumps({'counts': counts, 'dots': dots}))
''')


def test_on_a_mesh_the_products_split_over_the_ffn_axis_and_count_the_same():
  """The search runs W-PCA on replicated (gathered) kernels on every device of its mesh:
  `linear_count` splits its kernel products over the FFN axis (each of 8 fake devices
  multiplies its 5 of the kernel's 40 columns; on the search's BERT-base ELM population for
  v5e:4x4 a device otherwise repeated every 768 x 3,072 product in full), with the counts of one
  device."""
  out = subprocess.run([sys.executable, '-c', MESH_SCRIPT], capture_output=True, text=True,
                       cwd=REPO, timeout=600,
                       env={**os.environ, 'XLA_FLAGS': xla_flags_with_devices(8),
                            'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.splitlines()[-1])
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(120, 16)) * 0.8 ** np.arange(16)).astype(np.float32)
  k = rng.normal(size=(16, 40)).astype(np.float32)
  assert got['counts'] == [int(pca_count_linear(jnp.asarray(x), jnp.asarray(k), eta))
                           for eta in (0.5, 0.9, 0.99)]
  dims = [[int(d) for d in shape.split(',')] for shape in got['dots']]
  assert [16, 5] in dims, got  # a device's own columns of the [16, 40] product
  assert not any(40 in d for d in dims), got  # nobody multiplies all 40


LAYER_SPLIT_SCRIPT = textwrap.dedent('''
  import json
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec
  from elastic_jax import parallel
  from elastic_jax.proxies import features
  rng = np.random.default_rng(5)
  L, N, D, F = 5, 96, 16, 40
  x = (rng.normal(size=(L, N, D)) * 0.8 ** np.arange(D)).astype(np.float32)
  k = rng.normal(size=(L, D, F)).astype(np.float32)
  valid = (rng.random(N) > 0.1).astype(np.float32)
  fields = {'on': jnp.asarray([True, True, False, True, True]),
            'ffn_in': jnp.asarray(rng.choice([8, 16], L)),
            'ffn': jnp.asarray(rng.choice([10, 20, 40], L))}
  count = lambda x, k, valid, fields: features._counts_by_layer(x, valid, k, fields, 0.99,
                                                                ((8, 16), (10, 20, 40)))

  def scan_lengths(jaxpr, in_shard_map=False):  # (inside a shard_map?, trip count) of every scan
    out = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'scan':
        out.append([in_shard_map, eqn.params['length']])
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if hasattr(getattr(sub, 'jaxpr', sub), 'eqns'):
            out += scan_lengths(getattr(sub, 'jaxpr', sub),
                                in_shard_map or eqn.primitive.name == 'shard_map')
    return out

  mesh = parallel.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  rep = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec()))
  args = (rep(x), rep(k), rep(valid), jax.tree.map(rep, fields))
  with parallel.mesh_context(mesh):
    scans = scan_lengths(jax.make_jaxpr(count)(*args).jaxpr)
  print(json.dumps({'x': x.tolist(), 'k': k.tolist(), 'valid': valid.tolist(),
                    'fields': {f: np.asarray(v).tolist() for f, v in fields.items()},
                    'counts': np.asarray(jax.jit(parallel.on_mesh(count, mesh))(*args)).tolist(),
                    'scans': scans, 'scans_one_device': scan_lengths(
                        jax.make_jaxpr(count)(x, k, valid, fields).jaxpr)}))
''')


def test_on_a_mesh_each_device_counts_its_own_layers():
  """The search's per-width W-PCA counts of a masked arch's layers (`features._counts_by_layer`):
  on 8 fake devices each device runs the factorisations and eigendecompositions of its own layers
  (one of the 5, padded to 8), not of all 5 as every device did; the counts are those of the
  layers' pre-activations at their active widths (float64 NumPy; off layer 0)."""
  out = subprocess.run([sys.executable, '-c', LAYER_SPLIT_SCRIPT], capture_output=True,
                       text=True, cwd=REPO, timeout=600,
                       env={**os.environ, 'XLA_FLAGS': xla_flags_with_devices(8),
                            'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.splitlines()[-1])
  assert got['scans'] == [[True, 1]], got['scans']  # per device: one layer's count
  assert got['scans_one_device'] == [[False, 5]], got['scans_one_device']
  x, k, valid = (np.asarray(got[n], np.float64) for n in ('x', 'k', 'valid'))
  f = got['fields']
  expected = []
  for i in range(5):
    d, w = f['ffn_in'][i], f['ffn'][i]
    want, near = reference(x[i][:, :d] @ k[i][:d, :w], 0.99, valid)
    assert near > MARGIN
    expected.append(want if f['on'][i] else 0)
  assert got['counts'] == expected


def test_vpca_groups_layers_of_each_shape_and_keeps_their_order():
  """`features.vpca` on a masked arch whose FFN layers come in two shapes, interleaved: each
  shape's layers are counted together (`_counts_by_layer`), every layer at its active widths,
  summed with bottleneck layers excluded; equal to float64 NumPy on the formed pre-activations."""
  from elastic_jax.proxies import features
  rng = np.random.default_rng(6)
  shapes = [(16, 40), (8, 24), (16, 40), (8, 24), (16, 40)]
  active = [(16, 20), (8, 24), (8, 40), (8, 12), (16, 10)]
  on = [True, True, True, False, True]
  bottleneck = [0.0, 1.0, 0.0, 0.0, 0.0]
  b, t = 2, 48
  valid = (rng.random((b, t)) > 0.1).astype(np.float32)
  xs = [(rng.normal(size=(b, t, d)) * 0.8 ** np.arange(d)).astype(np.float32) for d, _ in shapes]
  ks = [rng.normal(size=(d, f)).astype(np.float32) for d, f in shapes]
  layers = [{'on': jnp.asarray(o), 'ffn_in': jnp.asarray(d), 'ffn': jnp.asarray(f),
             'bottleneck': jnp.asarray(n)} for o, (d, f), n in zip(on, active, bottleneck)]
  got = jax.jit(lambda xs, ks, v, lay: features.vpca(
      xs, ks, v, lay, 0.99, 'exclude', widths=((8, 16), (10, 12, 20, 24, 40))))(
          [jnp.asarray(x) for x in xs], [jnp.asarray(k) for k in ks], jnp.asarray(valid), layers)
  expected = 0
  for x, k, o, (d, f), n in zip(xs, ks, on, active, bottleneck):
    want, near = reference(x.reshape(-1, x.shape[-1])[:, :d] @ k[:d, :f], 0.99, valid.ravel())
    assert near > MARGIN
    expected += want * o * (1 - n)
  assert float(got) == expected
