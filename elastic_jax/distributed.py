"""Multi-process JAX: one controller process per host, every process running the same program.

On a TPU pod slice each host runs `elastic-jax train ...`; `initialize` joins the processes into
one JAX runtime (`jax.distributed.initialize`) before anything touches a device. Afterwards
`jax.devices()` lists the devices of every host, a mesh spans them all, and each jitted step runs
on all hosts at once (collectives over ICI between chips, gloo over TCP between CPU processes).

Where the settings come from, first match wins:
1. the config's `distributed` section (`default_config()`): an explicit coordinator address,
   process count and process id (local runs, custom clusters);
2. JAX's environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
   (what launch/local_multiprocess.sh sets);
3. automatic detection of a managed cluster (Cloud TPU VMs and GKE, Slurm, Open MPI), where
   `jax.distributed.initialize()` finds everything itself (`distributed.auto`);
4. otherwise a single process: nothing to do.

Every process reads its own shards of the data (`process_batch_shard` says which), assembles the
global batch with `global_batch` (`jax.make_array_from_process_local_data`), writes its own shards
of each Orbax checkpoint (Orbax coordinates the processes; the workdir must be a filesystem every
host shares), and only process 0 logs and writes files. `check_same_config` stops every process
with one clear line when the processes were started with different configs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping

import ml_collections
import numpy as np

from elastic_jax.config import check_known_fields
from elastic_jax.errors import UserError

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
SECTION = 'distributed'


def default_config() -> ml_collections.ConfigDict:
  """The `distributed` config section, every field commented."""
  c = ml_collections.ConfigDict()
  # host:port of process 0's coordinator service; '' = $JAX_COORDINATOR_ADDRESS or auto-detected
  # (TPU VMs, GKE, Slurm, Open MPI). Every process must use the same address.
  c.coordinator_address = ''
  c.num_processes = 0  # total processes; 0 = $JAX_NUM_PROCESSES or auto-detected
  c.process_id = -1  # this process, 0..num_processes-1; -1 = $JAX_PROCESS_ID or auto-detected
  c.local_device_ids = ()  # restrict this process to these local devices; () = all
  c.auto = True  # on a detected cluster with nothing set, call jax.distributed.initialize()
  c.initialization_timeout = 300  # seconds to wait for every process to connect
  return c


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process stands after `initialize`."""

  process_index: int
  process_count: int
  local_devices: int
  devices: int
  how: str  # 'single' | 'explicit' | 'environment' | 'cluster' | 'already initialized'

  @property
  def is_main(self) -> bool:
    return self.process_index == 0


def _section(cfg) -> Mapping:
  merged = default_config().to_dict()
  if cfg is not None:
    section = cfg.get(SECTION, None) if hasattr(cfg, 'get') else None
    if section is not None:
      section = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
      check_known_fields(SECTION, section, merged)
      merged.update(section)
  return merged


def _env_int(name: str, default: int) -> int:
  value = os.environ.get(name, '')
  if not value:
    return default
  try:
    return int(value)
  except ValueError:
    raise UserError(f'environment variable {name}={value!r} must be an integer') from None


def _cluster_detected() -> bool:
  """Whether JAX's own cluster detection would find a managed multi-process environment.

  Reads JAX's private cluster registry (no public API says whether `jax.distributed.initialize()`
  would find a cluster without calling it, which blocks); tests/scale/test_private_jax_apis.py
  fails if the attributes used here change."""
  try:
    from jax._src import clusters
    with warnings.catch_warnings():  # e.g. "Kubernetes detected, but no kubernetes package"
      warnings.simplefilter('ignore')
      return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method)
  except Exception:  # noqa: BLE001  (a private API: if it moves, fall back to single process)
    return False


def settings(cfg=None) -> dict:
  """The resolved (coordinator_address, num_processes, process_id, local_device_ids, how)."""
  s = _section(cfg)
  how = 'explicit'
  coordinator = str(s['coordinator_address'] or '')
  num = int(s['num_processes'] or 0)
  pid = int(s['process_id'])
  if not coordinator and not num:
    coordinator = os.environ.get(ENV_COORDINATOR, '')
    num = _env_int(ENV_NUM_PROCESSES, 0)
    if pid < 0:
      pid = _env_int(ENV_PROCESS_ID, -1)
    how = 'environment'
  elif pid < 0:
    pid = _env_int(ENV_PROCESS_ID, -1)
  if not coordinator and not num:
    how = 'cluster' if (bool(s['auto']) and _cluster_detected()) else 'single'
  return {'coordinator_address': coordinator, 'num_processes': num, 'process_id': pid,
          'local_device_ids': tuple(int(i) for i in s['local_device_ids']),
          'timeout': int(s['initialization_timeout']), 'how': how}


def _validate(st: dict) -> None:
  if st['how'] == 'explicit':
    name = lambda field: f'config distributed.{field}'
  else:
    name = {'coordinator_address': ENV_COORDINATOR, 'num_processes': ENV_NUM_PROCESSES,
            'process_id': ENV_PROCESS_ID}.get
  coordinator, num, pid = st['coordinator_address'], st['num_processes'], st['process_id']
  if not coordinator or ':' not in coordinator or not coordinator.rsplit(':', 1)[1].isdigit():
    raise UserError(f'{name("coordinator_address")}={coordinator!r} must be host:port of process '
                    "0 (e.g. '10.0.0.2:8476' or '127.0.0.1:8476'), the same for every process")
  if num < 1:
    raise UserError(f'{name("num_processes")}={num} must be the total number of processes (>= 1)')
  if not 0 <= pid < num:
    raise UserError(f'{name("process_id")}={pid} must be in [0, {num}): give each process its '
                    'own id, 0 for the coordinator')


def initialize(cfg=None) -> ProcessInfo:
  """Joins this process to the others (see the module docstring); call before any device use.

  Idempotent: a second call (or a runtime initialised elsewhere) only reports.
  """
  import jax
  st = settings(cfg)
  how = st['how']
  if jax.distributed.is_initialized():
    how = 'already initialized'
  elif how in ('explicit', 'environment'):
    _validate(st)
    jax.distributed.initialize(st['coordinator_address'], st['num_processes'], st['process_id'],
                               local_device_ids=list(st['local_device_ids']) or None,
                               initialization_timeout=st['timeout'])
  elif how == 'cluster':
    jax.distributed.initialize(initialization_timeout=st['timeout'])
  info = ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count(), how)
  if not info.is_main:
    quiet_logging()
  return info


def quiet_logging() -> None:
  """Processes other than 0 keep only warnings and errors (Orbax and absl are chatty)."""
  logging.getLogger().setLevel(logging.WARNING)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


def is_main() -> bool:
  import jax
  return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Agreement between processes.


def _config_text(cfg) -> str:
  d = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  d.pop(SECTION, None)  # process_id differs by design
  return json.dumps(d, sort_keys=True, default=repr)


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def allgather_json(obj) -> list:
  """Every process's JSON-serialisable `obj`, in process order (a collective: all must call)."""
  import jax
  if jax.process_count() == 1:
    return [json.loads(json.dumps(obj))]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(gathered,
                                                                      sizes.reshape(-1))]


def check_same_config(cfg, **extra) -> None:
  """Raises UserError in every process when any process was given a different config (the
  `distributed` section aside) or different `extra` values (e.g. workdir=...)."""
  import jax
  if jax.process_count() == 1:
    return
  text = _config_text(cfg) + json.dumps(extra, sort_keys=True, default=str)
  digest = hashlib.sha256(text.encode()).hexdigest()
  digests = allgather_json(digest)
  if len(set(digests)) == 1:
    return
  # Someone disagrees: gather the configs themselves to name the fields.
  everyone = allgather_json({'config': json.loads(_config_text(cfg)), **{k: str(v) for k, v in
                                                                        extra.items()}})
  ref = _flatten(everyone[0])
  for p, other in enumerate(everyone):
    theirs = _flatten(other)
    diff = sorted(k for k in set(ref) | set(theirs) if ref.get(k) != theirs.get(k))
    if diff:
      shown = ', '.join(f'{k.removeprefix("config.")}={theirs.get(k)!r} (process 0: '
                        f'{ref.get(k)!r})' for k in diff[:3])
      more = f' and {len(diff) - 3} more' if len(diff) > 3 else ''
      raise UserError(f'process {p} of {len(everyone)} was started with a different config: '
                      f'{shown}{more}; start every process with the same --config, flags and '
                      '--workdir')


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# Data: per-process shards of the global batch.


def process_batch_shard(sharding, global_rows: int) -> tuple[int, int]:
  """(index, count): which block of `global_rows` rows this process's devices hold under the
  batch `sharding`, and how many blocks there are (= processes).

  Process p feeds its block with the data shard `index` of `count`. On the usual meshes (devices
  in process order) index == jax.process_index(); on others (e.g. a TPU mesh laid out for the
  ICI torus) the block order differs from the process order, and this is the order to use.
  Raises UserError when a process's devices do not hold one contiguous block of distinct rows
  (e.g. the tensor axis spans processes while the batch axes do not).
  """
  import jax
  count = jax.process_count()
  if global_rows % count:
    raise UserError(f'data.batch_size={global_rows} is not divisible by the {count} processes')
  rows = global_rows // count
  index_map = sharding.addressable_devices_indices_map((global_rows,))
  covered = set()
  for idx in index_map.values():
    sl = idx[0] if idx else slice(None)
    start, stop, _ = sl.indices(global_rows)
    covered.update(range(start, stop))
  first = min(covered)
  if len(covered) != rows or covered != set(range(first, first + rows)) or first % rows:
    raise UserError(f'the mesh gives process {jax.process_index()} batch rows '
                    f'{sorted(covered)[:4]}... ({len(covered)} of {global_rows}), not one block '
                    f'of {rows}: the batch axes (data, fsdp) must split the batch across '
                    'processes; make mesh.data * mesh.fsdp a multiple of the process count')
  return first // rows, count


def global_batch(local_batch: Mapping, sharding) -> dict:
  """This process's rows -> global jax.Arrays sharded by `sharding` (the batch axis first).

  One process: the same as `jax.device_put(local_batch, sharding)`.
  """
  import jax
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def put_global(tree, sharding):
  """Host values that are identical on every process (another run's weights, an external teacher,
  the evaluation set) -> global arrays with `sharding` (one Sharding, or a tree of them matching
  `tree`, whose leaves may stand for NNX variables); each process fills its own devices."""
  import jax

  def one(x, s):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  leaves, treedef = jax.tree.flatten(tree)
  if isinstance(sharding, jax.sharding.Sharding):
    shardings = [sharding] * len(leaves)
  else:
    shardings = jax.tree.leaves(sharding)
  return treedef.unflatten([one(x, s) for x, s in zip(leaves, shardings, strict=True)])


def to_host(x) -> np.ndarray:
  """A global array's value on every process (fetched from the others where needed)."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
