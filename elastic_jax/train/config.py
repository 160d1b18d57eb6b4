"""The `train` and `mesh` config sections, every field commented."""

from __future__ import annotations

import ml_collections

from elastic_jax.train.dynamic import config as dynamic_config


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = 1000  # optimizer steps
  # AdamW with linear warmup then cosine (or linear) decay to end_lr_fraction * learning_rate.
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.schedule = 'cosine'  # 'cosine' | 'linear' | 'constant'
  c.end_lr_fraction = 0.1
  c.weight_decay = 0.01  # applied to matrices only (not to biases, norms)
  c.b1 = 0.9
  c.b2 = 0.98
  c.grad_clip = 1.0  # global gradient-norm clipping; 0 = off
  c.grad_accum = 1  # micro-batches per step (the batch is split, gradients summed)
  # With mesh.fsdp > 1: gather the FSDP-sharded parameters once per micro-batch (all K
  # sub-networks read the gathered copy; gradients reduce-scattered back) instead of leaving
  # the layout of every matmul to XLA (elastic_jax/parallel.py, `gather_fn`).
  c.gather_params = True
  # Cross-entropy and logits KL over chunks of this many positions (of every row): at most
  # [rows, logits_chunk, vocab] logits live at once, recomputed in the backward pass, and the
  # teacher's log-probabilities are computed once per chunk for every sub-network. 0 = off (the
  # whole [rows, seq_len, vocab] at once; fastest where it fits, e.g. small vocabularies).
  c.logits_chunk = 0
  # The K - 1 sub-networks after the first run unrolled (the program holds one copy of the
  # supernet's forward and backward per sub-network; K is static) instead of in a `lax.scan`
  # (one copy, compile time independent of K). Unrolled, XLA fuses across them: the quickstart
  # sandwich step (K = 4) ran 1.27x faster on a 2-core CPU (bench/results/bench_train.md) and
  # the GPT-2-medium step for v5e:4x4 needed 8.92 GiB per chip instead of 10.47 (at 57d69c8,
  # before train.dense_static_archs; README, "The K sub-networks of a step").
  c.unroll_subnets = True
  # The sub-networks every step trains (the sandwich's largest and smallest, a fixed arch,
  # anchors) run as their dense models, sliced from the supernet inside the step (the gradient
  # flows back through the slices), instead of masked at the supernet's sizes: the same
  # function of the parameters (masked == exported) at the dense models' cost. Off where the
  # space changes in training (train.dynamic) or SCONE is on: those keep the masked pass.
  c.dense_static_archs = True
  # Which sub-networks each step trains (elastic_jax/train/sampling.py):
  # 'standard' | 'random' | 'sandwich' (largest + smallest + num_random) | 'random_linear' |
  # 'fixed' (only `arch`, e.g. one found by training-free search) | 'stratified' (largest +
  # smallest + num_random spread over parameter counts, whittle's) | 'anchored' (every arch of
  # `anchor_archs` + num_random spread over the parameter counts they span; compress's).
  c.sampling = 'sandwich'
  c.num_random = 2  # sandwich: uniformly sampled sub-networks per step
  c.anchor_archs = ''  # ARCHS.jsonl: the archs 'anchored' trains every step
  c.ramp_steps = 1000  # random_linear: steps over which P(sub-network) grows 0 -> 1
  c.arch = ''  # ARCH.json: train only this architecture (sets sampling='fixed')
  # Distillation (elastic_jax/train/distill.py). The teacher is the largest sub-network
  # (in-place KD, when sampling trains it first) or an external dense model (`teacher`).
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ''  # '' = in-place; or an exported model dir / a workdir with checkpoints
  c.distill.temperature = 1.0
  c.distill.ce = 1.0  # weight of the students' own cross-entropy
  c.distill.logits_kl = 1.0  # KL(teacher || student) on logits
  c.distill.hidden_mse = 0.0  # MSE of layer outputs (learned projections if widths differ)
  c.distill.attn_kl = 0.0  # KL of head-averaged attention distributions (TinyBERT)
  c.distill.block_preserving = 0.0  # ELM: channel-normalised MSE on embed/attn/FFN outputs
  c.distill.layer_map = ()  # teacher layer per supernet layer; () = uniform (TinyBERT)
  # Every distillation term is off before `start_step`, then ramps in linearly over `ramp_steps`
  # (the students' cross-entropy is always on): an in-place teacher first learns from the data.
  c.distill.start_step = 0
  c.distill.ramp_steps = 0
  # Bookkeeping.
  c.log_every = 20  # steps between metric lines (JSONL, TensorBoard, progress bar)
  c.eval_every = 200  # steps between validation of the named sub-networks; 0 = only at the end
  # Names or ARCH.json paths, evaluated with one compile (a `train.arch` run evaluates that arch).
  c.eval_archs = ('largest', 'smallest')
  c.checkpoint_every = 200  # steps between (asynchronous) Orbax checkpoints
  c.keep_checkpoints = 3
  c.init_from = ''  # start from another run's workdir or an exported model dir
  # ELM's dynamic modules: PCA-guided FFN width growth and CKA head pruning, which change the
  # space during training (elastic_jax/train/dynamic/config.py); off by default.
  c.dynamic = dynamic_config.default_config()
  return c


def default_mesh() -> ml_collections.ConfigDict:
  """Device mesh: data x fsdp x tensor; one axis may be -1 (all remaining devices)."""
  c = ml_collections.ConfigDict()
  c.data = -1  # pure data parallelism over the remaining devices
  c.fsdp = 1  # parameters and optimizer state sharded along the hidden axis
  c.tensor = 1  # heads, FFN and vocabulary split across devices
  return c


def check(tcfg) -> None:
  """UserError naming the first `train` field with an impossible value (before a run creates
  anything)."""
  from elastic_jax.errors import UserError  # noqa: PLC0415

  for name, low in (('steps', 1), ('log_every', 1), ('checkpoint_every', 1),
                    ('keep_checkpoints', 1), ('grad_accum', 1), ('eval_every', 0),
                    ('warmup_steps', 0), ('num_random', 0), ('logits_chunk', 0)):
    value = tcfg.get(name, low)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise UserError(f'config field train.{name}={value!r} must be an integer >= {low}')
  for name in ('unroll_subnets', 'dense_static_archs'):
    if not isinstance(tcfg.get(name, True), bool):
      raise UserError(f'config field train.{name}={tcfg[name]!r} must be True or False')
  if not float(tcfg.learning_rate) > 0:
    raise UserError(f'config field train.learning_rate={tcfg.learning_rate!r} must be positive')
