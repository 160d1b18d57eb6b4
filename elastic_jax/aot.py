"""Ahead-of-time compilation for a TPU slice on a CPU-only machine: `elastic-jax compile`.

  elastic-jax compile --config=configs/gpt2_medium_supernet.py --topology=v5e:4x4

With the `libtpu` wheel installed (`pip install -e '.[tpu]'`), `get_topology_desc` describes the
devices of a TPU slice without owning one. The training step is built exactly as the trainer builds
it (same shardings, same donation; an external teacher as its shapes, its weights unread); the
population evaluation is the search's own compiled loop (`driver.advance`, built by
`search.program.build`, the function `search` calls, on the config's mesh with the search's
shardings, chunking and micro-batches), lowered with abstract arguments
(`jax.ShapeDtypeStruct`s carrying `NamedSharding`s over the slice's mesh) and compiled by the TPU
compiler. The report gives, per program and per device:
- memory (XLA's buffer assignment): arguments, outputs, aliased (donated) bytes, temporaries,
  generated code, and the peak, against the chip's HBM;
- XLA's FLOP count and its estimated run time (`optimal_seconds`, a roofline estimate of the
  compiled program: no collectives' latency, no host work);
- MFU estimate: the sub-networks' analytic model FLOPs (`cost.py`; with an external teacher,
  train.distill.teacher, its forward too) over (chips x peak x estimated time). The masked
  supernet runs every sub-network at the supernet's widths, so this is lower than the hardware
  FLOP utilisation (`xla_flops_utilisation`).

The third program, `dense_step`, is the reference: the plain cross-entropy training step of the
largest sub-network's dense export (`train.step.make_dense_step`: same batch, micro-batches,
optimizer, shardings and donation; no masks, sandwich or distillation), what a non-elastic
trainer would run. `masked_over_dense` is the masked step's estimated time per model FLOP over
the reference's (1 = no cost for elasticity).

XLA's cost analysis counts the body of a loop once. The trainer runs its micro-batches in a
`lax.scan` and, inside it, the first sub-network and then the other K - 1 in another scan; the
search's fitness maps over chunks of archs and, inside, scans over batches and micro-batches. By
default (`flops='loops'`) the counts are multiplied accordingly: train x grad_accum, counted on a
twin whose other loops run unrolled (below); eval: one generation's fitness (a separate compile
of the fitness alone, every child evaluated) x chunks x batches x micro-batches. Memory is the
search loop's, FLOPs and times one generation's. `flops='unrolled'` compiles analysis programs
instead (one micro-batch with every loop unrolled; one (arch, micro-batch)): XLA's exact count.
'loops' agrees with 'unrolled' within 3% on the train step (tested) and 10% on the population
evaluation, so read FLOPs, times and MFU as estimates; memory is exact: it always comes from the
real programs.

The twin: the masked supernet runs its layers in a `lax.scan` (`model.scan_layers`), so compile
time no longer grows with depth, the K - 1 sub-networks in another and the vocabulary losses'
chunks (`train.logits_chunk`) in a third. The train step's FLOPs and bytes come from a twin
program with the layers, the sub-networks and the chunks unrolled, each layer rematerialised by
`model.remat` as in the scan, so recomputation is counted (a second compile, whose time
and host memory grow with depth x K); `flops='none'` skips it. Counting the sub-network scan's
body once and scaling it x K / 2 instead came out ~40% above the unrolled program's
bytes on a 2-layer GPT-2-medium-width step: in XLA's count a looped body weighs more than an
unrolled iteration (its carry and stacked residuals are traffic the unrolled program can fuse).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import logging
import math
import os
import re
import time

from elastic_jax.errors import UserError

# Set before JAX loads the TPU plugin. The plugin refuses to load while another process of this
# machine holds its lockfile (any JAX process may take it once the wheel is installed); compiling
# for a topology needs no chip, so allow concurrent loads. Without TPU chips, also tell libtpu
# there is no metadata server or worker list to find; a TPU VM keeps its own settings.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
if not glob.glob('/dev/accel*') and not os.path.exists('/dev/vfio'):
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip facts of a TPU generation."""

  name: str
  hbm_bytes: int
  peak_bf16_flops: float  # dense bf16 FLOP/s
  hbm_bytes_per_s: float
  torus_dims: int  # 2: topologies AxB; 3: AxBxC


# Sources: Cloud TPU system architecture pages, "key chip specifications" tables:
#   v4:  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2, 1228 GB/s
#   v5e: https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s
#   v5p: https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s
#   v6e: https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GB HBM, 1640 GB/s
CHIPS = {
    'v4': Chip('TPU v4', 32 * GIB, 275e12, 1228e9, 3),
    'v5e': Chip('TPU v5e', 16 * GIB, 197e12, 819e9, 2),
    'v5p': Chip('TPU v5p', 95 * GIB, 459e12, 2765e9, 3),
    'v6e': Chip('TPU v6e', 32 * GIB, 918e12, 1640e9, 2),
}
_TOPOLOGY = re.compile(r'^(?P<chip>[a-z0-9]+):(?P<shape>\d+(?:x\d+)*)$')
PROGRAMS = ('train_step', 'population_eval', 'dense_step')
FLOP_METHODS = ('loops', 'unrolled', 'none')


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """'v5e:4x4' -> ('v5e', (4, 4)); a clear UserError for anything else."""
  example = 'CHIP:AxB for v5e/v6e or CHIP:AxBxC for v4/v5p, e.g. v5e:4x4 or v5p:2x2x2'
  m = _TOPOLOGY.match(topology.strip().lower())
  if not m or m['chip'] not in CHIPS:
    raise UserError(f'unknown topology {topology!r}: write {example} (chips: {", ".join(CHIPS)})')
  chip = CHIPS[m['chip']]
  shape = tuple(int(s) for s in m['shape'].split('x'))
  if len(shape) != chip.torus_dims:
    raise UserError(f'unknown topology {topology!r}: a {chip.name} slice has '
                    f'{chip.torus_dims} dimensions; write {example}')
  if min(shape) < 1:
    raise UserError(f'unknown topology {topology!r}: every dimension counts chips, so is at '
                    f'least 1; write {example}')
  return m['chip'], shape


def tpu_devices(topology: str) -> list:
  """The devices of a TPU slice, from libtpu's topology description (no TPU needed)."""
  parse_topology(topology)
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform='tpu', topology_name=topology.strip().lower())
  except Exception as e:  # noqa: BLE001  (a missing plugin and a bad name both surface here)
    import importlib.util
    text = f'{type(e).__name__}: {e}'
    if importlib.util.find_spec('libtpu') is None:
      raise UserError(f'cannot describe TPU topology {topology!r} ({_first_line(text)}); '
                      "compiling for TPU needs the tpu extra: pip install -e '.[tpu]'") from None
    reason = next((l.strip() for l in text.splitlines() if 'INVALID_ARGUMENT' in l),
                  _first_line(text))
    raise UserError(f'TPU topology {topology!r} is not available: {reason[:300]} (libtpu '
                    'describes the slices a real pod offers: each dimension a multiple of a '
                    'host\'s chips)') from None
  return list(topo.devices)


def _first_line(text: str) -> str:
  return next((l.strip() for l in str(text).splitlines() if l.strip()), '')[:300]


# ---------------------------------------------------------------------------------------------
# The trainer's state and step, abstract (shapes + shardings, no arrays).


def batch_keys(cfg) -> dict:
  """The arrays of one training batch as the trainer feeds them (name -> dtype)."""
  import jax.numpy as jnp
  if cfg.data.task == 'glue':
    raise UserError("config data.task='glue' trains no supernet; compile a causal_lm or mlm config")
  return {'tokens': jnp.int32, 'targets': jnp.int32, 'weights': jnp.float32,
          'segment_ids': jnp.int32, 'positions': jnp.int32}


def model_flops_per_token(cfg, cost: dict, *, train: bool):
  """The analytic model FLOPs per token of one arch's `cost` (`space.cost`): forward, or
  training (3 x forward). A masked-LM loss reads the vocabulary at the predicted positions only
  (data.mlm_probability of them), so the vocabulary projection counts there alone, whether a
  step forms logits at every position or not (data.mlm_max_predictions)."""
  unneeded = 1.0 - float(cfg.data.mlm_probability) if cfg.data.task == 'mlm' else 0.0
  flops = cost['flops_per_token'] - unneeded * cost['vocab_flops_per_token']
  return 3.0 * flops if train else flops


def teacher_flops_per_token(cfg) -> float:
  """The external teacher's (train.distill.teacher) analytic forward FLOPs per token, which the
  training step runs besides its sub-networks; 0 for the in-place teacher (the largest
  sub-network, trained and counted among them)."""
  if not cfg.train.distill.teacher:
    return 0.0
  from elastic_jax import cost
  from elastic_jax.train.trainer import load_teacher
  teacher = load_teacher(cfg.train.distill.teacher, cfg, abstract=True)
  arch_cost = cost.arch_cost(teacher.cfg, cost.dense_arch(teacher.dims),
                             bottleneck_head_dim=teacher.dims.bottleneck_head_dim,
                             seq_len=int(cfg.data.seq_len))
  return float(model_flops_per_token(cfg, arch_cost, train=False))


def abstract_batch(cfg, rows: int, sharding) -> dict:
  """The abstract training batch of `rows` rows (`batch_keys`, [rows, seq_len] each, and a
  masked-LM batch's `mlm_positions` [rows, data.mlm_max_predictions] where that is set)."""
  import jax
  import jax.numpy as jnp
  shape = (int(rows), int(cfg.data.seq_len))
  batch = {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding)
           for k, d in batch_keys(cfg).items()}
  cap = int(cfg.data.get('mlm_max_predictions', 0))
  if cfg.data.task == 'mlm' and cap:
    batch['mlm_positions'] = jax.ShapeDtypeStruct((shape[0], cap), jnp.int32, sharding=sharding)
  return batch


def train_program(cfg, mesh, *, grad_accum: int | None = None, batch_size: int | None = None,
                  unroll_inner: bool = False):
  """(the trainer's StepSetup over `mesh`, its abstract (state, batch, teacher) arguments).
  `unroll_inner`: the loops over the K - 1 sub-networks and train.logits_chunk's chunks traced
  unrolled (the FLOP-counting twin). An external teacher (train.distill.teacher) enters as its
  shapes alone (`trainer.load_teacher(abstract=True)`: its weights are not read), laid out as
  the trainer lays out the real one."""
  from flax import nnx

  from elastic_jax import parallel
  from elastic_jax.train.trainer import build_step, load_teacher
  teacher = teacher_args = None
  if cfg.train.distill.teacher:
    teacher = load_teacher(cfg.train.distill.teacher, cfg, abstract=True)
  setup = build_step(cfg, mesh, teacher, grad_accum=grad_accum, unroll_inner=unroll_inner)
  if teacher is not None:
    teacher_args = parallel.with_shardings(nnx.state(teacher, nnx.Param),
                                           setup.teacher_shardings)
  rows = cfg.data.batch_size if batch_size is None else batch_size
  return setup, (setup.abstract_state(), abstract_batch(cfg, rows, setup.batch_sharding),
                 teacher_args)


def dense_program(cfg, mesh):
  """(the jitted plain training step of the largest sub-network's dense export over `mesh`, its
  abstract (state, batch) arguments, the dense model's analytic training FLOPs per token).

  The reference a non-elastic trainer would run: the same batch, micro-batches, optimizer,
  parameter shardings (by the same logical names) and donation as the masked step; no masks, no
  sandwich, no distillation, the exported model's layers as the exported model runs them."""
  import jax
  from flax import nnx

  from elastic_jax import export, parallel
  from elastic_jax.train.step import (
      abstract_state,
      make_dense_step,
      make_optimizer,
      state_shardings,
  )
  from elastic_jax.workdir import build_space

  space = build_space(cfg)
  largest = space.largest()
  graphdef, params = nnx.split(export.abstract_export(space.model, space.cfg, largest), nnx.Param)
  params = nnx.State({'model': params})
  tx, _ = make_optimizer(cfg.train)
  shardings = parallel.param_shardings(params, mesh)
  state_sharding = state_shardings(tx, params, shardings, mesh)
  state = abstract_state(params, tx, state_sharding)
  batch_sharding = parallel.batch_sharding(mesh)
  step = jax.jit(parallel.on_mesh(make_dense_step(
      graphdef, tx, int(cfg.train.grad_accum), micro_sharding=parallel.microbatch_sharding(mesh),
      gather=parallel.gather_fn(cfg, mesh)), mesh),
                 in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)
  batch = abstract_batch(cfg, cfg.data.batch_size, batch_sharding)
  return step, (state, batch), float(model_flops_per_token(cfg, space.cost(largest), train=True))


@contextlib.contextmanager
def unrolled_scans():
  """Traces every `lax.scan` (and `lax.map`) fully unrolled, so XLA's cost analysis, which counts
  a loop body once, counts every iteration.

  Why a monkeypatch of JAX's private `loops` module: the scans to unroll are inside the training
  step and `lax.map`, which JAX implements by calling `loops.scan` through its module global, and
  JAX has no public switch that unrolls them. tests/scale/test_private_jax_apis.py fails if
  `jax.lax.scan` stops being `loops.scan`, if its signature changes, or if the patch no longer
  removes the loops from a lowered scan and map. Only functions traced inside the context are
  unrolled (JAX reuses a trace made before it), so build the program to analyse inside.
  """
  import jax
  from jax._src.lax.control_flow import loops
  original = loops.scan

  def scan(f, init, xs=None, length=None, reverse=False, unroll=1, _split_transpose=False):
    return original(f, init, xs, length, reverse=reverse, unroll=True,
                    _split_transpose=_split_transpose)

  jax.lax.scan, loops.scan = scan, scan
  try:
    yield
  finally:
    jax.lax.scan, loops.scan = original, original


# ---------------------------------------------------------------------------------------------
# Compiling and reporting.


_OOM = re.compile(r'memory required for (?P<what>[^(]*)\((?P<need>[\d.]+)(?P<unit>[KMGT]?)\)'
                  r'.*available HBM \((?P<have>[\d.]+)(?P<hunit>[KMGT]?)\)')
_UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}


class DoesNotFit(Exception):
  """The TPU compiler refused the program: it needs more HBM than a device has."""

  def __init__(self, need: int, have: int, message: str):
    super().__init__(message)
    self.need, self.have, self.message = need, have, message


@contextlib.contextmanager
def _kept_out_of_the_persistent_cache():
  """Programs compiled for a topology's description would go to the persistent compilation
  cache like any other (the CLI turns it on), where they can never be loaded (that needs a
  client of the real chips: JAX warns and compiles again) and only evict useful entries. JAX
  checks the cache's minimum compile time at every write; above any compile time, nothing is
  written."""
  import jax

  key = 'jax_persistent_cache_min_compile_time_secs'
  before = getattr(jax.config, key)
  jax.config.update(key, float('inf'))
  try:
    yield
  finally:
    jax.config.update(key, before)


def _compile(jitted, *args):
  """(compiled, seconds) of a program for a topology's devices; raises DoesNotFit when the TPU
  compiler runs out of HBM."""
  t = time.perf_counter()
  try:
    lowered = jitted.lower(*args)
    t_lowered = time.perf_counter()
    with _kept_out_of_the_persistent_cache():
      compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001  (XlaRuntimeError / JaxRuntimeError by jax version)
    text = str(e)
    m = _OOM.search(text.replace('\n', ' '))
    if 'RESOURCE_EXHAUSTED' not in text or m is None:
      raise
    need = int(float(m['need']) * _UNITS[m['unit']])
    have = int(float(m['have']) * _UNITS[m['hunit']])
    raise DoesNotFit(need, have, _first_line(text)) from None
  t_end = time.perf_counter()
  logging.info('lowered in %.1f s, compiled in %.1f s', t_lowered - t, t_end - t_lowered)
  return compiled, t_end - t


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  parts = {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
           'aliased': m.alias_size_in_bytes, 'temporaries': m.temp_size_in_bytes,
           'code': m.generated_code_size_in_bytes}
  total = (parts['arguments'] + parts['outputs'] - parts['aliased'] + parts['temporaries']
           + parts['code'])
  peak = int(getattr(m, 'peak_memory_in_bytes', 0) or 0)
  return {**{k: int(v) for k, v in parts.items()}, 'total': int(max(total, peak))}


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return {'flops': float(cost.get('flops', 0.0)),
          'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
          'seconds': float(cost.get('optimal_seconds', 0.0))}


def _mean_train_flops(cfg, space, archs) -> float:
  """Mean of the analytic training FLOPs per token summed over each step's archs."""
  import jax
  import numpy as np
  costs = jax.vmap(jax.vmap(lambda a: model_flops_per_token(cfg, space.cost(a), train=True)))(
      archs)
  return float(np.asarray(costs).sum(axis=1).mean())


def _entry(name: str, build, flops, model_flops: float, chip: Chip, devices_per_chip: int,
           hbm: int, peak_total: float) -> dict:
  """Compiles `build()`, the real program, and summarises it.

  `flops` says how to count its FLOPs and time: ('loops', k): XLA's counts of the real program
  times k (its loop bodies, counted once by XLA, run k times as a whole); ('compile', analyse, k):
  the counts of the program `analyse()` builds, times k; None: the raw counts only.
  """
  entry = {'program': name, 'hbm_bytes_per_device': hbm, 'model_flops': model_flops}
  try:
    compiled, seconds = _compile(*build())
  except DoesNotFit as e:
    zeros = dict.fromkeys(('arguments', 'outputs', 'aliased', 'temporaries', 'code'), 0)
    return {**entry, 'memory_bytes': {**zeros, 'total': e.need}, 'hbm_fraction': e.need / hbm,
            'fits': False, 'compiler_hbm_bytes': e.have, 'error': e.message}
  entry.update(memory_bytes=_memory(compiled), compile_seconds=seconds)
  entry['hbm_fraction'] = entry['memory_bytes']['total'] / hbm
  entry['fits'] = entry['memory_bytes']['total'] <= hbm
  raw = _cost(compiled)
  del compiled  # a large program's executable holds GBs of host memory
  entry['xla_flops_loop_bodies_once'] = raw['flops']
  if flops is None:
    entry.update(xla_flops_per_device=None, estimated_seconds=None, mfu_estimate=None,
                 xla_flops_utilisation=None)
    return entry
  if flops[0] == 'compile':
    cost = _cost(_compile(*flops[1]())[0])
  else:
    cost = raw
  k = flops[-1]
  flops_dev, est = cost['flops'] * k, cost['seconds'] * k
  peak = chip.peak_bf16_flops / devices_per_chip
  if est <= 0:  # no XLA estimate: a roofline of the chip's peak FLOP/s and HBM bandwidth
    est = max(flops_dev / peak, cost['bytes_accessed'] * k * devices_per_chip
              / chip.hbm_bytes_per_s)
  entry.update(flops_method=flops[0], xla_flops_per_device=flops_dev,
               xla_bytes_accessed_per_device=cost['bytes_accessed'] * k,
               estimated_seconds=est, xla_flops_utilisation=flops_dev / (est * peak),
               mfu_estimate=model_flops / (est * peak_total))
  return entry


class _Lowered:
  """Adapts an already lowered program to `_compile(jitted, *args)`."""

  def __init__(self, lowered):
    self.lowered = lowered

  def lower(self):
    return self.lowered


def compile_report(cfg, topology: str, *, programs=PROGRAMS, flops: str = 'loops') -> dict:
  """Compiles `programs` of `cfg` for `topology`; returns the report (see the module docstring).

  `flops`: how FLOPs and times are counted (see the module docstring): 'loops' (the real
  programs' counts times their loop trip counts; no extra compile), 'unrolled' (analysis
  compiles with the loops unrolled: exact, but a large model's unrolled step needs tens of GB
  of host memory to compile) or 'none' (memory only). Raises UserError for an unknown topology,
  no program or an unknown one, a mesh that does not fit it, or a bad config; a program that
  does not fit in HBM is reported (`fits: False`), not raised.
  """
  import jax

  from elastic_jax import arch as arch_lib
  from elastic_jax import parallel
  from elastic_jax.train.trainer import check_batch
  from elastic_jax.workdir import build_space

  chip_name, shape = parse_topology(topology)
  chip = CHIPS[chip_name]
  if flops not in FLOP_METHODS:
    raise UserError(f'unknown FLOP counting {flops!r}; choose from {list(FLOP_METHODS)}')
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown:
    raise UserError(f'unknown program(s) {unknown}; choose from {list(PROGRAMS)}')
  if not programs:
    raise UserError(f'no program to compile; name one or more of {list(PROGRAMS)}')
  devices = tpu_devices(topology)
  chips = math.prod(shape)
  devices_per_chip = max(len(devices) // chips, 1)
  hbm = chip.hbm_bytes // devices_per_chip
  try:
    mesh = parallel.make_mesh(cfg.get('mesh', {}), devices)
  except UserError as e:
    raise UserError(f'the config mesh does not fit topology {topology} ({len(devices)} devices): '
                    f'{e}') from None
  check_batch(cfg, mesh)
  tcfg = cfg.train
  space = build_space(cfg)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  common = {'chip': chip, 'devices_per_chip': devices_per_chip, 'hbm': hbm,
            'peak_total': chips * chip.peak_bf16_flops}
  report = {'topology': topology, 'chip': chip.name, 'chips': chips, 'devices': len(devices),
            'hbm_bytes_per_device': hbm, 'peak_flops_per_chip': chip.peak_bf16_flops,
            'mesh': {k: int(v) for k, v in mesh.shape.items()},
            'params_max': int(space.cost(space.largest())['params']),
            'batch': [int(cfg.data.batch_size), int(cfg.data.seq_len)],
            'grad_accum': int(tcfg.grad_accum), 'dtype': str(cfg.model.get('dtype', 'float32')),
            'programs': {}}

  # XLA counts a loop body once: the FLOPs of a model whose layers run in a `lax.scan` are counted
  # on its twin with the layers unrolled (the same computation; memory is the real program's).
  unscanned = None
  if flops == 'loops' and cfg.model.get('scan_layers', True) and space.num_layers > 1:
    unscanned = copy.deepcopy(cfg)
    with unscanned.unlocked():
      unscanned.model.scan_layers = False
  if 'train_step' in programs:
    setup, args = train_program(cfg, mesh)
    report['replicated_fraction'] = setup.sharding_report['replicated_fraction']
    micro = cfg.data.batch_size // tcfg.grad_accum

    def analyse():
      # One micro-batch with the sub-network scan unrolled, x grad_accum (the optimizer update,
      # a few FLOPs per parameter, is then counted grad_accum times: negligible).
      one, one_args = train_program(cfg, mesh, grad_accum=1, batch_size=micro)
      with unrolled_scans():
        lowered = one.step.lower(*one_args)
      return (_Lowered(lowered),)

    k = setup.sampler.k
    if flops == 'unrolled' or (flops == 'loops' and k == 1):
      ok = micro % (mesh.shape['data'] * mesh.shape['fsdp']) == 0
      method = ('compile', analyse, tcfg.grad_accum) if ok else None
    elif flops == 'loops':
      # XLA counts the micro-batch scan's body once: x grad_accum. Inside it, a twin runs every
      # other loop unrolled: the layers (model.scan_layers off), the other K - 1 sub-networks and
      # the vocabulary chunks (train.logits_chunk). The sub-network scan counted once and scaled
      # x K / 2 came out ~40% above the unrolled count (`train.step.make_loss_fn`). Without
      # scanned layers or chunks, and with the sub-networks unrolled (train.unroll_subnets) or
      # K <= 2 (one iteration), the real program is counted exactly.
      unrolled_k = bool(tcfg.get('unroll_subnets', True))
      if unscanned is None and not int(tcfg.get('logits_chunk', 0)) and (unrolled_k or k <= 2):
        method = ('loops', tcfg.grad_accum * (1 if unrolled_k else k / 2))
      else:
        twin, twin_args = train_program(unscanned or cfg, mesh, unroll_inner=True)
        method = ('compile', lambda: (twin.step, *twin_args), tcfg.grad_accum)
    else:
      method = None
    archs = arch_lib.stack([setup.sampler(jax.random.key(int(cfg.seed)), s) for s in range(8)])
    teacher_flops = teacher_flops_per_token(cfg)
    entry = _entry('train_step', lambda: (setup.step, *args), method,
                   (_mean_train_flops(cfg, space, archs) + teacher_flops) * tokens, **common)
    entry['archs_per_step'] = int(k)
    if cfg.train.distill.teacher:
      entry['teacher_flops_per_token'] = teacher_flops
    report['programs']['train_step'] = entry

  if 'population_eval' in programs:
    entry = _population_entry(cfg, space, mesh, unscanned, flops, tokens, common)
    report['programs']['population_eval'] = entry
  if 'dense_step' in programs:
    step, dense_args, dense_flops = dense_program(cfg, mesh)

    def unrolled():  # one micro-batch per scan iteration, every iteration counted
      with unrolled_scans():
        return (_Lowered(dense_program(cfg, mesh)[0].lower(*dense_args)),)

    method = {'loops': ('loops', tcfg.grad_accum), 'unrolled': ('compile', unrolled, 1)}.get(flops)
    report['programs']['dense_step'] = _entry('dense_step', lambda: (step, *dense_args), method,
                                              dense_flops * tokens, **common)
  report['masked_over_dense'] = masked_over_dense(report['programs'])
  report['fits'] = all(p['fits'] for p in report['programs'].values())
  return report


def masked_over_dense(programs: dict) -> float | None:
  """The masked training step's estimated time per model FLOP over the dense reference's (the
  dense step's MFU estimate over the masked step's): 1 = as efficient as a non-elastic trainer
  on the largest sub-network; None without both estimates."""
  masked, dense = programs.get('train_step', {}), programs.get('dense_step', {})
  if not (masked.get('mfu_estimate') and dense.get('mfu_estimate')):
    return None
  return dense['mfu_estimate'] / masked['mfu_estimate']


def _search_program(cfg, mesh):
  """The search's program for `cfg` on `mesh`, built by the function the search calls
  (`search.program.build`) from shapes only: (search config, space, program). Objectives that
  prepare their own minibatches (zero-cost proxies) prepare them from placeholder batches of the
  validation batches' shapes: only their shapes are used."""
  from flax import nnx

  from elastic_jax.search import program as search_program
  from elastic_jax.search.config import search_config
  from elastic_jax.search.objectives import get_objective
  from elastic_jax.search.proxy_objective import register_proxies
  from elastic_jax.workdir import build_space, init_supernet

  sc = search_config(cfg)
  register_proxies(sc.objectives, cfg.get('proxy', None))  # as the search job does
  space = build_space(cfg)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: init_supernet(cfg, space)))
  batch = abstract_batch(cfg, cfg.data.batch_size, None)
  n_batches = int(cfg.data.eval_batches) or 1
  data = search_program.stacked_shapes(state, batch, n_batches)
  prepared = [o for o in map(get_objective, sc.objectives) if o.prepare]
  if prepared:  # e.g. zero-cost proxies: their minibatches' shapes, from placeholder batches
    import jax
    import numpy as np
    ones = [{k: np.ones(v.shape, v.dtype) for k, v in batch.items()}] * n_batches
    extra = {o.name: o.prepare(space, None, ones) for o in prepared}
    data['extra'] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                 extra)
  return sc, space, search_program.build(sc, space, mesh, graphdef=graphdef, data=data)


def _population_entry(cfg, space, mesh, unscanned, flops: str, tokens: int, common) -> dict:
  """The search's population evaluation: what `search` runs per `search.checkpoint_every`
  generations (`driver.advance`, its fitness on the config's mesh), compiled for memory; FLOPs,
  time and MFU are those of one generation's evaluation of its n_children archs."""
  import jax
  import numpy as np
  from flax import nnx

  from elastic_jax import evaluation, parallel
  from elastic_jax.search import program as search_program
  from elastic_jax.search.config import n_children_of
  from elastic_jax.search.objectives import get_objective

  sc, _, prog = _search_program(cfg, mesh)
  plan, fitness = prog.plan, prog.fitness
  n_children = n_children_of(sc)
  n_batches = int(cfg.data.eval_batches) or 1
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  genomes = jax.ShapeDtypeStruct((n_children, space.num_genes), np.int32, sharding=rep)

  def build():
    return (_Lowered(search_program.lowered_advance(prog)),)

  def fitness_lowered(p):  # one generation's fitness, every child evaluated
    return _Lowered(jax.jit(p.fitness.fn).lower(genomes, p.fitness.data))

  def analyse():  # one (arch, micro-batch), x children x batches x micro-batches; unrolled
    data = fitness.data
    rows = cfg.data.batch_size // plan.micro_batches
    batch = {k: jax.ShapeDtypeStruct((rows, *v.shape[2:]), v.dtype,
                                     sharding=jax.sharding.NamedSharding(
                                         mesh, jax.sharding.PartitionSpec(*v.sharding.spec[1:])))
             for k, v in data['batches'].items()}
    arch = jax.eval_shape(space.decode, jax.ShapeDtypeStruct((space.num_genes,), np.int32))
    arch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), arch)
    one = jax.jit(lambda s, a, b: evaluation.batch_sums(
        nnx.merge(fitness.fn.graphdef, parallel.gathered(s, mesh)), b, a))
    with unrolled_scans():
      lowered = one.lower(data['state'], arch, batch)
    return (_Lowered(lowered),)

  # XLA counts one (chunk of archs, batch, micro-batch) of the nested loops.
  loops = -(-n_children // plan.chunk) * n_batches * plan.micro_batches
  if unscanned is None:
    loops_method = ('compile', lambda: (fitness_lowered(prog),), loops)
  else:  # the twin with layers unrolled, as for the training step
    loops_method = ('compile', lambda: (fitness_lowered(_search_program(unscanned, mesh)[2]),),
                    loops)
  method = {'loops': loops_method,
            'unrolled': ('compile', analyse,
                         n_children * n_batches * plan.micro_batches)}.get(flops)
  if any(get_objective(n).prepare for n in sc.objectives):
    # A zero-cost proxy's work (PCA, gradients) is no model forward the analytic FLOPs or the
    # loss-only analysis program count: memory and XLA's raw counts only.
    method = None
  archs = space.sample(jax.random.key(0), n_children)
  flops_per_token = np.asarray(jax.vmap(
      lambda a: model_flops_per_token(cfg, space.cost(a), train=False))(archs))
  entry = _entry('population_eval', build, method,
                 float(flops_per_token.sum()) * tokens * n_batches, **common)
  entry.update(population=n_children, chunk=plan.chunk, micro_batches=plan.micro_batches,
               eval_batches=n_batches, generations_per_call=sc.checkpoint_every,
               logits_bytes_per_device=plan.logits_bytes, max_logits_bytes=plan.bound_bytes)
  return entry


def check_fits(report: dict) -> None:
  """One line naming the first program that does not fit in HBM (UserError), else nothing."""
  for name, p in report['programs'].items():
    if not p['fits']:
      m = p['memory_bytes']
      detail = (f' ({m["arguments"] / GIB:.2f} arguments + {m["temporaries"] / GIB:.2f} '
                'temporaries)' if m['arguments'] else '')
      raise UserError(
          f'{name} needs {m["total"] / GIB:.2f} GiB per device on {report["topology"]}{detail}, '
          f'more than the {p["hbm_bytes_per_device"] / GIB:.1f} GiB HBM of a {report["chip"]} '
          'device; shard more (mesh.fsdp), raise train.grad_accum or lower data.batch_size')


def format_report(report: dict) -> str:
  """A few human-readable lines (the CLI prints the JSON report; this is for logs and bench)."""
  lines = [f'{report["topology"]} ({report["chip"]}, {report["devices"]} devices, '
           f'{report["hbm_bytes_per_device"] / GIB:.1f} GiB HBM each), mesh {report["mesh"]}, '
           f'{report["params_max"] / 1e6:.0f}M max params, batch {report["batch"]}']
  for name, p in report['programs'].items():
    m = p['memory_bytes']
    line = (f'  {name}: {m["total"] / GIB:.2f} GiB/device ({p["hbm_fraction"]:.0%} of HBM; '
            f'args {m["arguments"] / GIB:.2f}, temps {m["temporaries"] / GIB:.2f})')
    if p.get('estimated_seconds'):
      line += (f', {p["xla_flops_per_device"] / 1e12:.2f} TFLOP/device, est. '
               f'{p["estimated_seconds"]:.3f} s, MFU~{p["mfu_estimate"]:.1%}')
    line += ', fits' if p['fits'] else ', DOES NOT FIT'
    lines.append(line)
  return '\n'.join(lines)
