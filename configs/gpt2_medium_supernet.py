"""GPT-2-medium-sized decoder supernet (~353M parameters at its largest) for TPU slices.

The largest sub-network is GPT-2 medium (24 layers, hidden 1024, 16 heads of 64, FFN 4096,
learned positions, pre-LayerNorm, GELU, tied embeddings, context 1024); the space shrinks depth,
hidden, heads and FFN width per layer. bf16 compute, float32 parameters and optimizer state, the
mesh pure FSDP over every chip (parameters, gradients and Adam moments split 1/N per chip).

Arguments (the slice decides batch, gradient accumulation and remat; check a change with `compile`):
  v5e-16    (default) 16 v5e chips, topology v5e:4x4 (gcloud accelerator type v5litepod-16)
  v5p-8     8 v5p chips, topology v5p:2x2x2 (gcloud accelerator type v5p-16: v5p counts cores)
  runlocal  a CPU-sized space of the same family, for laptops and tests

Check that it compiles and fits, on any machine (needs `pip install -e '.[tpu]'`):
  elastic-jax compile --config=configs/gpt2_medium_supernet.py --topology=v5e:4x4
  elastic-jax compile --config=configs/gpt2_medium_supernet.py:v5p-8 --topology=v5p:2x2x2
Train on a v5e-16 slice (4 hosts of 4 chips; see launch/README.md):
  launch/tpu_vm.sh create --name=ej --zone=us-west4-a --type=v5litepod-16
  launch/tpu_vm.sh run --name=ej --zone=us-west4-a -- train \
      --config=configs/gpt2_medium_supernet.py --workdir=/mnt/shared/gpt2_medium
"""

import ml_collections

from elastic_jax import data, distributed
from elastic_jax.train import config as train_config

# slice -> global batch rows, tokens per row, gradient-accumulation micro-batches, model.remat.
# Rows divide by the chip count x grad_accum (every micro-batch spans all chips). Sized with
# `compile` (elastic-jax compile on a CPU, 24 layers, recomputation counted): every micro-batch
# gathers the FSDP-sharded parameters again and reads the 50,304 x 1,024 embedding, which at
# 512 tokens per chip per micro-batch were most of XLA's byte count. On v5e:4x4 the whole
# 128 x 512 batch in one micro-batch with 'full' remat fits in 8.1 GiB per chip and is estimated
# at 261 ms per step (MFU est. 43%); 8 micro-batches with 'dots_saveable' were 743 ms (15%, with
# no recomputation counted), 2 with 'full' 321 ms, 2 with 'dots_saveable' 388 ms (11.8 GiB):
# byte-bound, saving the matmul outputs costs more HBM traffic than recomputing them. On
# v5p:2x2x2 likewise: one micro-batch with 'full', 274 ms in 13.4 GiB; 4 with 'dots_saveable'
# 387 ms. bench/results/aot.md has the configured programs' figures.
SLICES = {'v5e-16': (128, 512, 1, 'full'), 'v5p-8': (64, 1024, 1, 'full')}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or 'v5e-16'
  if arg not in (*SLICES, 'runlocal'):
    raise ValueError(f'configs/gpt2_medium_supernet.py takes {", ".join(SLICES)} or runlocal, '
                     f'got {arg!r}')
  local = arg == 'runlocal'
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0

  # GPT-2 family.
  cfg.model = ml_collections.ConfigDict()
  cfg.model.kind = 'decoder'
  # GPT-2's 50257 ids padded to a multiple of 128 (MXU tiles; divisible by any tensor axis);
  # a GPT-2 tokenizer.json (data.tokenizer) fits, and so does a BPE trained to this size.
  cfg.model.vocab_size = 1024 if local else 50304
  cfg.model.max_len = 64 if local else 1024
  cfg.model.positions = 'learned'
  cfg.model.norm = 'layernorm'
  cfg.model.norm_placement = 'pre'
  cfg.model.mlp = 'gelu'
  cfg.model.tie_embeddings = True
  cfg.model.use_bias = True
  cfg.model.dtype = 'float32' if local else 'bfloat16'  # compute dtype; bf16 on the MXUs
  cfg.model.param_dtype = 'float32'  # master weights and Adam moments stay float32
  # The layers' backward keeps every residual unless told otherwise: with 8 micro-batches on
  # v5e:4x4 the step needed 35.2 GiB per chip without remat, 11.8 GiB with 'dots_saveable'
  # (matmul outputs kept, the rest recomputed) and 3.6 GiB with 'full' (elastic-jax compile on a
  # CPU, before the parameters were gathered per micro-batch). Per slice: SLICES above.
  batch, seq_len, accum, remat = (8, 32, 1, 'none') if local else SLICES[arg]
  cfg.model.remat = remat
  # On TPU the Pallas splash kernel, so no [B, heads, T, T] scores reach HBM (einsum attention on
  # other platforms; model/fused_attention.py; bench/results/aot.md has the step's figures).
  cfg.model.attention = 'einsum' if local else 'splash'
  # Masked sub-networks compute every head and FFN unit and mask the inactive ones on TPU, rather
  # than skip blocks of them by lax.cond: compiled for v5e:4x4 (the 2-layer twin of
  # bench/results/aot_ablation.md, at d0295ef) the conditionals add 11.3 GB of HBM traffic per
  # step in XLA's count (39.1 -> 50.4 GB, est. 48 -> 62 ms), ~2.8 GB per layer and random
  # sub-network at 4,096 tokens per chip: more time than the whole layer's matmuls, whereas
  # skipping saves about a quarter of a random sub-network's head and FFN work (uniform choices;
  # XLA charges a conditional its costliest branch, so that saving is not in its estimate). The
  # default (True, runlocal) skips: on a CPU it pays (bench/results/bench_train.md).
  cfg.model.skip_width_blocks = local

  # The elastic space: depth prefix, hidden, heads, FFN width per layer.
  cfg.space = ml_collections.ConfigDict()
  cfg.space.num_layers = 2 if local else 24
  cfg.space.hidden = (32, 48) if local else (768, 896, 1024)
  cfg.space.depth = (1, 2) if local else (12, 16, 20, 24)
  cfg.space.blocks = ('transformer',)
  cfg.space.heads = (2, 4) if local else (8, 12, 16)
  cfg.space.kv_groups = ()  # multi-head attention, as GPT-2
  cfg.space.head_dim = (8,) if local else (64,)
  cfg.space.ffn = (32, 64) if local else (2048, 3072, 4096)

  # Data: a TFDS corpus and a byte-level BPE trained on it (cached), or point data.tokenizer at
  # GPT-2's tokenizer.json. `runlocal` uses the embedded Python docs (no download).
  cfg.data = data.default_config()
  cfg.data.source = 'python_docs' if local else 'tfds:lm1b'
  cfg.data.task = 'causal_lm'
  cfg.data.tokenizer = 'bpe'
  cfg.data.bpe_vocab_size = cfg.model.get_ref('vocab_size')
  cfg.data.seq_len = seq_len  # the model's max_len stays 1024 (GPT-2's context)
  cfg.data.batch_size = batch  # rows per step over all hosts
  cfg.data.eval_batches = 2 if local else 8

  # Sandwich rule with in-place distillation (largest + smallest + 2 random per step).
  cfg.train = train_config.default_config()
  cfg.train.steps = 20 if local else 100_000
  cfg.train.learning_rate = 3e-3 if local else 3e-4
  cfg.train.warmup_steps = 5 if local else 2000
  cfg.train.grad_accum = accum
  # Vocabulary losses in chunks of positions (train.logits_chunk): off. Measured with `compile`
  # on v5e:4x4 (README, "Scaling out"): with 128 the 24-layer step's peak is no lower (12.10 vs
  # 11.79 GiB per chip; the peak is in the layers' backward pass, not at the logits), and on a
  # 2-layer twin it cut 1.6 GiB but XLA estimated 42% more time (recomputed logits, the
  # embedding's gradient summed over chunks). Turn it on where the logits decide the peak.
  cfg.train.logits_chunk = 0
  cfg.train.b2 = 0.95
  cfg.train.weight_decay = 0.1
  cfg.train.log_every = 5 if local else 100
  cfg.train.eval_every = 0 if local else 5000
  cfg.train.checkpoint_every = 10 if local else 2000

  # Pure FSDP over every chip: fsdp = -1 takes all devices (16 on v5e-16, 8 on v5p-8).
  cfg.mesh = train_config.default_mesh()
  cfg.mesh.data = 1
  cfg.mesh.fsdp = -1
  cfg.mesh.tensor = 1

  # Multi-host: found automatically on TPU VMs; set these for other clusters (launch/README.md).
  cfg.distributed = distributed.default_config()

  # Population evaluation (search) compiled by `elastic-jax compile`: archs per search generation.
  cfg.search = ml_collections.ConfigDict()
  cfg.search.pop_size = 8 if local else 50
  # Narrowing the supernet per hidden choice (search.hidden_buckets, on by default: about 2x on
  # a CPU) slices FSDP-sharded arrays, which moves them between chips every arch; not measured on
  # a pod, so off here.
  cfg.search.hidden_buckets = False
  return cfg
