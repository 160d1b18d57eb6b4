"""Meshes and shardings: how the supernet, optimizer state and batches lie across devices.

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters carry logical axis names (see
`model/layers.py`); `LOGICAL_RULES` maps each to a mesh axis: the hidden ('embed') axis is sharded
FSDP-style over 'fsdp', heads / FFN / vocabulary over 'tensor'. A logical axis whose size the mesh
axis does not divide stays replicated along it, and `check_sufficiently_sharded` refuses a layout
that leaves large tensors replicated on a multi-device mesh. The batch is split over
('data', 'fsdp'); archs and masks are tiny and replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from elastic_jax.errors import UserError

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
LOGICAL_RULES = {
    'vocab': 'tensor',
    'embed': 'fsdp',
    'heads': 'tensor',
    'kv': 'tensor',
    'mlp': 'tensor',
    'inner': 'fsdp',
    'factor': None,
    'head_dim': None,
    'pos': None,
    'types': None,
    'embed_out': None,  # the pooler's output features (its input is 'embed')
}


def mesh_shape(mesh_cfg: Mapping, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry; checks the product equals the device count."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise UserError(f'config mesh {dict(zip(AXES, sizes))}: at most one axis may be -1')
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f'config mesh {dict(zip(AXES, sizes))}: sizes must be positive or -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise UserError(f'config mesh {dict(zip(AXES, sizes))} does not fit {num_devices} '
                      f'devices: {known} does not divide {num_devices}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(f'config mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices but '
                    f'{num_devices} are available; make mesh.data*mesh.fsdp*mesh.tensor equal '
                    f'{num_devices} (or set one axis to -1)')
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


_PLATFORM = contextvars.ContextVar('elastic_jax_mesh_platform', default=None)


@contextlib.contextmanager
def mesh_context(mesh: Mesh | None):
  """While tracing under it, `jax.sharding.get_abstract_mesh()` is `mesh` and `target_platform()`
  its devices' platform (no-op for None): what code that must lay its own work out over the mesh
  reads (`jax.shard_map` around a Pallas kernel, which XLA's partitioner cannot split, and only
  in programs for TPU: model/fused_attention.py)."""
  if mesh is None:
    yield
    return
  token = _PLATFORM.set(mesh.devices.flat[0].platform)
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      yield
  finally:
    _PLATFORM.reset(token)


def target_platform() -> str:
  """The platform of the program being traced: the context mesh's (`mesh_context`; a TPU
  topology's when compiling ahead of time on a CPU), else JAX's default backend."""
  return _PLATFORM.get() or jax.default_backend()


def spread(x: jax.Array, axis: int) -> jax.Array:
  """`x` (inside traced code) constrained to lie split along `axis` over every device of the
  context mesh (`mesh_context`): for work on replicated operands that every device would
  otherwise repeat in full (the search's W-PCA products, `proxies.pca.linear_count`); XLA then
  splits the products that read `x` along that axis. `x` itself without a context mesh of more
  than one device, inside `shard_map` (each device's own work already), or when the mesh's size
  does not divide the axis."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes or x.shape[axis] % mesh.size:
    return x
  spec = [None] * x.ndim
  spec[axis] = tuple(mesh.axis_names)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def on_mesh(fn, mesh: Mesh | None):
  """`fn`, traced under `mesh_context(mesh)`: wrap a function before `jax.jit` over `mesh`."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with mesh_context(mesh):
      return fn(*args, **kwargs)
  return traced


def logical_to_spec(names, shape, mesh: Mesh) -> PartitionSpec:
  """PartitionSpec of one array from its logical axis names (replicating what doesn't divide)."""
  spec, used = [], set()
  for name, size in zip(names, shape):
    axis = LOGICAL_RULES.get(name)
    if axis is None or axis in used or size % mesh.shape[axis] or mesh.shape[axis] == 1:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh):
  """NamedShardings for a state of NNX variables carrying logical names (`out_sharding`)."""
  def one(var):
    names = var.get_metadata().get('out_sharding') or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
  """Stacked micro-batches [grad_accum, rows, ...]: each micro-batch over the batch axes."""
  return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def opt_state_shardings(tx, abstract_params, param_shardings, mesh: Mesh):
  """Shardings of the optimizer state: each moment like its parameter, counts replicated.

  (`jax.jit(tx.init)` alone may leave the moments unsharded: zeros depend on no input's sharding.)
  """
  import optax
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                               transform_non_params=lambda _: replicated(mesh),
                               is_leaf=lambda x: isinstance(x, nnx.Variable))


def gathered_shardings(shardings):
  """Where FSDP-sharded arrays are used: each NamedSharding of `shardings` with the 'fsdp' axis
  dropped from its spec (gathered), any 'tensor' split kept."""
  def one(s: NamedSharding) -> NamedSharding:
    spec = [None if a == 'fsdp' else a for a in s.spec]
    return NamedSharding(s.mesh, PartitionSpec(*spec))
  return jax.tree.map(one, shardings)


def constrain(tree, shardings):
  """`tree` with each array constrained to its sharding in `shardings` (the same leaves in the
  same order; the shardings' leaves may stand for whole NNX variables)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([jax.lax.with_sharding_constraint(x, s) for x, s in
                            zip(leaves, jax.tree.leaves(shardings), strict=True)])


def with_shardings(tree, shardings):
  """`tree` (arrays or shapes) as `jax.ShapeDtypeStruct`s, each carrying its sharding in
  `shardings` (the same leaves in the same order; the shardings' leaves may stand for whole NNX
  variables): abstract arguments to lower a program with."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in
                            zip(leaves, jax.tree.leaves(shardings), strict=True)])


def gathered(state: nnx.State, mesh: Mesh | None) -> nnx.State:
  """`state` (NNX variables carrying logical names; inside a jitted function) constrained to
  `gathered_shardings`: the parameters as a forward pass over a batch split on the batch axes
  reads them, gathered once over 'fsdp' (any 'tensor' split kept). `state` itself for None or a
  mesh without FSDP.

  The population evaluation (the search's, the trainer's) reads the supernet this way, for the
  reason `gather_fn` gives for training: left to choose, XLA's SPMD partitioner kept the
  FSDP-split hidden axis split and gathered the *batch* instead, so every device computed
  partial sums for the whole batch and all-reduced them, the whole batch's [B, T, vocab] logits
  included. Compiled for v5e:4x4, GPT-2 medium's population forward on a 2-layer twin: XLA's
  count of HBM bytes per device for one (arch, batch) 32.7 GB without, 4.5 GB with."""
  if mesh is None or mesh.shape['fsdp'] == 1:
    return state
  return constrain(state, gathered_shardings(param_shardings(state, mesh)))


def gather_fn(cfg, mesh: Mesh):
  """What the training step applies to the model's parameters before use (its `gather`): with
  `train.gather_params` on a mesh with mesh.fsdp > 1, `gathered` on `mesh`, else None.

  Why: left to choose, XLA's SPMD partitioner computes a weight gradient whose output is
  FSDP-sharded by all-gathering the activations (for the tied embedding, the whole batch's
  [B, T, vocab] logits gradient) instead of reduce-scattering the weight gradient. Gathering the
  parameters once per micro-batch makes every matmul local, and the gradients are reduce-scattered
  back (bench/results/aot.md measures it)."""
  if mesh.shape['fsdp'] == 1 or not cfg.train.get('gather_params', True):
    return None
  return functools.partial(gathered, mesh=mesh)


def check_batch(rows: int, mesh: Mesh, what: str = 'the training batch') -> int:
  """The number of ways the mesh splits a batch (mesh.data x mesh.fsdp); a UserError naming
  `what` when that does not divide its `rows` (data.batch_size)."""
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  if rows % ways:
    raise UserError(
        f'{what} has {rows} rows (data.batch_size) but the mesh splits batches {ways} ways '
        f'(mesh.data={mesh.shape["data"]} x mesh.fsdp={mesh.shape["fsdp"]}); make '
        f'data.batch_size a multiple of {ways} or change mesh.data / mesh.fsdp')
  return ways


def check_sufficiently_sharded(state: nnx.State, shardings, mesh: Mesh,
                               max_replicated_fraction: float = 0.25,
                               min_size: int = 1 << 16) -> dict:
  """Refuses layouts that silently replicate large tensors on a model-parallel mesh.

  Returns {'replicated_fraction', 'bytes_per_device', 'ideal_bytes_per_device'}.
  """
  model_ways = mesh.shape['fsdp'] * mesh.shape['tensor']
  total = per_device = 0
  offenders = []
  for var, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    size = int(np.prod(var.shape))
    shard = int(np.prod(sharding.shard_shape(var.shape)))
    total += size
    per_device += shard
    if model_ways > 1 and shard == size and size >= min_size:
      offenders.append((size, var.shape))
  ideal = total / max(model_ways, 1)
  replicated_fraction = sum(s for s, _ in offenders) / max(total, 1)
  if replicated_fraction > max_replicated_fraction:
    worst = sorted(offenders, reverse=True)[:3]
    raise UserError(f'{replicated_fraction:.0%} of the parameters would be replicated on every '
                    f'device of the mesh {dict(mesh.shape)} (largest: '
                    f'{[tuple(s) for _, s in worst]}); choose mesh sizes that divide the model '
                    'dimensions (hidden for fsdp; heads, FFN, vocab for tensor)')
  return {'replicated_fraction': replicated_fraction, 'bytes_per_device': per_device * 4,
          'ideal_bytes_per_device': ideal * 4}
