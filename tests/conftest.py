"""Shared test helpers: small random models, the shared data folder."""

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

# One persistent XLA compilation cache for the whole test run, shared by the xdist workers and by
# every subprocess the tests start (they inherit the environment): a program that several tests, or
# a run and its resumed run, compile the same way is compiled once. Set before JAX is imported, so
# JAX reads it; the process that made the folder (the xdist controller, or the only process)
# removes it at exit. A cache the caller set is used and kept.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='elastic-jax-tests-xla-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

# Cheaper CPU compiles for the test run: the tests compile hundreds of small programs and run each
# a few times, so compiling dominates (about two thirds of a test's time). LLVM optimisation off
# (-O0) takes about a third off it (flexibert proxies 129 s -> 95 s, growth + cached decoding
# 233 s -> 158 s); XLA's older loop emitters instead of its MLIR fusion emitters take a further
# 40-55% off what is left (model equivalence + masked/dense proxies: backend compile 127 s -> 55 s,
# the files' wall time 200 s -> 130 s; the train-step file 58 s -> 36 s), running no slower. Not
# for users: at XLA's default -O2 the loop emitters compile slower and run slower (quickstart, 60
# training steps: backend compile 10.3 s -> 22.6 s, 5,400 -> 4,500 tokens/s). Results differ only
# in float rounding; the masked == exported invariant is checked in float64. A setting the caller
# made is kept.
# {XLA option: (the test run's value, XLA's default)}.
_CHEAP_COMPILES = {'xla_backend_optimization_level': (0, 2),
                   'xla_cpu_use_fusion_emitters': (False, True)}
for _name, (_value, _) in _CHEAP_COMPILES.items():
  if _name not in os.environ.get('XLA_FLAGS', ''):
    _flag = f'--{_name}={str(_value).lower()}'
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

# The same options at XLA's defaults, for `jax.jit(..., compiler_options=XLA_DEFAULTS)`: a test of
# what the user's programs compute bit for bit compiles them as the user's run does.
XLA_DEFAULTS = {name: default for name, (_, default) in _CHEAP_COMPILES.items()}


def xla_flags_with_devices(n: int) -> str:
  """XLA_FLAGS for a subprocess that fakes `n` CPU devices, keeping the test run's flags."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()


import jax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get('ELASTIC_JAX_SHARED_DATA', REPO.parent / 'shared' / 'data'))


def randomize(model: nnx.Module, seed: int, scale: float = 0.3) -> nnx.Module:
  """Perturbs every parameter (biases and norm scales too), so no slicing bug hides behind the
  zeros and ones of the initialisation."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@contextlib.contextmanager
def lowerings():
  """Yields the names of the programs JAX lowers inside the block (JAX's own lowering events,
  which fire with or without the persistent cache): a host call run as one compiled program
  lowers one program, the same call op by op one per primitive."""
  names = []

  def listener(event, duration, **kw):
    del duration
    if event == '/jax/core/compile/jaxpr_to_mlir_module_duration':
      names.append(kw.get('fun_name'))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def teacher_log_probs_calls(monkeypatch) -> list:
  """[n]: how many times `losses.teacher_log_probs` has *run* (a callback inside it, so a
  function traced once but executed per chunk or per sub-network counts every execution)."""
  from elastic_jax import losses
  count = [0]
  original = losses.teacher_log_probs

  def counted(logits, temperature):
    jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
    return original(logits, temperature)

  monkeypatch.setattr(losses, 'teacher_log_probs', counted)
  return count


@pytest.fixture
def shared_data() -> Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f'shared data folder {SHARED_DATA} is absent (set ELASTIC_JAX_SHARED_DATA)')
  return SHARED_DATA


def load_config(name: str, arg: str | None = None):
  """An experiment config from configs/ (as `--config=configs/name.py:arg` would load it)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f'configs.{name}', REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope='session')
def data_cache(tmp_path_factory) -> Path:
  """One dataset / tokenizer cache for the whole session (builds are keyed by their options)."""
  return tmp_path_factory.mktemp('data_cache')


@pytest.fixture
def tiny_cfg(data_cache):
  cfg = load_config('quickstart', 'tiny')
  cfg.data.cache_dir = str(data_cache)
  return cfg


@pytest.fixture(autouse=True)
def _no_shared_steps_between_tests():
  """Each test starts with no training step kept by `train` (trainer.shared_step): a test that
  patches the step's code must not be given a step traced before the patch. Within a test,
  calling `train` again with the same config reuses its step, as for a user."""
  trainer = sys.modules.get('elastic_jax.train.trainer')  # imported by a test, if at all
  if trainer is not None:
    trainer.clear_shared_steps()
  yield


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  """Drops JAX's compiled programs and traces after each test module: one long process runs the
  whole suite, and the executables of big compiles (TPU-topology programs, 200-arch property
  tests) would otherwise stay resident to its end."""
  yield
  jax.clear_caches()
  import gc
  gc.collect()
