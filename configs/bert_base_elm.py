"""BERT-base-sized encoder supernet in the ELM / W-PCA search space, for TPU slices.

configs/bert_elm.py's space (arXiv 2510.27037, 2504.15983) scaled to BERT-base: 12 layers,
hidden 768, 12 heads of 64, factorised embedding 128; each layer a BERT block or a MobileBERT-style
bottleneck block (inner width 192), FFN width in {384, 768, ..., 3072}; masked LM at 128 tokens.
bf16 compute, float32 parameters and Adam moments, the mesh pure FSDP over every chip.

Arguments:
  v5e-16    (default) 16 v5e chips, topology v5e:4x4 (gcloud accelerator type v5litepod-16)
  v5p-8     8 v5p chips, topology v5p:2x2x2 (gcloud accelerator type v5p-16)
  runlocal  a CPU-sized space of the same shape, for laptops and tests

  elastic-jax compile --config=configs/bert_base_elm.py --topology=v5e:4x4
  elastic-jax compile --config=configs/bert_base_elm.py:v5p-8 --topology=v5p:2x2x2
  launch/tpu_vm.sh run --name=ej --zone=us-west4-a -- train \
      --config=configs/bert_base_elm.py --workdir=/mnt/shared/bert_base_elm
"""

import ml_collections

from elastic_jax import data, distributed
from elastic_jax.train import config as train_config

# slice -> (global batch rows, gradient-accumulation micro-batches)
SLICES = {'v5e-16': (256, 1), 'v5p-8': (256, 1)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or 'v5e-16'
  if arg not in (*SLICES, 'runlocal'):
    raise ValueError(f'configs/bert_base_elm.py takes {", ".join(SLICES)} or runlocal, '
                     f'got {arg!r}')
  local = arg == 'runlocal'
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0

  # BERT family: bidirectional, post-norm LayerNorm, GELU, learned positions, token types, MLM
  # head with a transform and a vocabulary bias, tied to the factorised embedding.
  cfg.model = ml_collections.ConfigDict()
  cfg.model.kind = 'encoder'
  # BERT's 30522 WordPiece ids padded to a multiple of 128; a BPE trained to this size fits too.
  cfg.model.vocab_size = 1024 if local else 30592
  cfg.model.max_len = 128 if local else 512
  cfg.model.positions = 'learned'
  cfg.model.norm = 'layernorm'
  cfg.model.norm_placement = 'post'
  cfg.model.norm_eps = 1e-12
  cfg.model.mlp = 'gelu'
  cfg.model.tie_embeddings = True
  cfg.model.embed_dim = 32 if local else 128  # factorised embedding (< hidden)
  cfg.model.use_bias = True
  cfg.model.output_bias = True
  cfg.model.head_transform = True
  cfg.model.type_vocab_size = 2
  cfg.model.dtype = 'float32' if local else 'bfloat16'
  cfg.model.param_dtype = 'float32'
  # Scanned layers keep every residual of the scan body unless rematerialised; 'full' keeps only
  # each layer's input (the safe choice for 16 GiB v5e chips; see configs/gpt2_medium_supernet.py).
  cfg.model.remat = 'none' if local else 'full'
  # On TPU the Pallas splash kernel: no [B, heads, T, T] scores in HBM (einsum attention on other
  # platforms; model/fused_attention.py).
  cfg.model.attention = 'einsum' if local else 'splash'
  # On TPU the masked sub-networks compute every FFN unit and mask the inactive ones rather than
  # skip column blocks by lax.cond: compiled for v5e:4x4 the conditionals added 20.7 GB of HBM
  # traffic per step to XLA's count (est. 108 ms with them at 76478e4, 82 without: aot.md's
  # history), more than skipping saves even here, where uniform FFN choices leave about half of
  # a random sub-network's FFN work inactive (configs/gpt2_medium_supernet.py has the arithmetic;
  # bench/results/aot.md the figures as configured).
  cfg.model.skip_width_blocks = local

  # The W-PCA space: per layer {BERT, bottleneck} x FFN width; hidden and heads fixed.
  unit = 12 if local else 192  # FFN widths are multiples of hidden / 4
  cfg.space = ml_collections.ConfigDict()
  cfg.space.num_layers = 4 if local else 12
  cfg.space.hidden = (48,) if local else (768,)
  cfg.space.depth = (cfg.space.num_layers,)
  cfg.space.blocks = ('transformer', 'bottleneck')
  cfg.space.heads = (4,) if local else (12,)
  cfg.space.kv_groups = ()  # multi-head attention
  cfg.space.head_dim = ()  # hidden / heads = 64
  cfg.space.ffn = tuple(unit * k for k in (2, 4, 8, 12, 16))  # 384, 768, 1536, 2304, 3072
  cfg.space.inner = (unit,)  # bottleneck inner width (MobileBERT-style)
  cfg.space.bottleneck_head_dim = 0  # inner / heads = 16

  # Masked LM on a TFDS corpus (`runlocal`: the embedded Python docs, no download).
  cfg.data = data.default_config()
  cfg.data.source = 'python_docs' if local else 'tfds:lm1b'
  cfg.data.task = 'mlm'
  cfg.data.tokenizer = 'bpe'
  cfg.data.bpe_vocab_size = cfg.model.get_ref('vocab_size')
  cfg.data.seq_len = 64 if local else 128
  # Vocabulary logits at the predicted positions only (BERT's max_predictions_per_seq): at most
  # seq_len / 4 + 4 per row (36 of 128, 20 of 64; follows --config.data.seq_len), about the mean
  # 15% plus four standard deviations, so the cap almost never binds and the vocabulary's work
  # and memory fall about 3.5x.
  cfg.data.mlm_max_predictions = cfg.data.get_ref('seq_len') // 4 + 4
  batch, accum = (8, 1) if local else SLICES[arg]
  cfg.data.batch_size = batch
  cfg.data.eval_batches = 2 if local else 8

  # Sandwich rule, in-place KD with ELM's block-preserving loss.
  cfg.train = train_config.default_config()
  cfg.train.steps = 20 if local else 100_000
  cfg.train.learning_rate = 1e-3 if local else 5e-4
  cfg.train.warmup_steps = 5 if local else 2000
  cfg.train.grad_accum = accum
  # Vocabulary losses in chunks of positions (train.logits_chunk): off, as for GPT-2 medium,
  # where chunks did not lower the step's peak memory and cost estimated time; not measured on
  # this config (`elastic-jax compile` it with --config.train.logits_chunk=32 to compare).
  cfg.train.logits_chunk = 0
  cfg.train.distill.block_preserving = 1.0
  cfg.train.log_every = 5 if local else 100
  cfg.train.eval_every = 0 if local else 5000
  cfg.train.checkpoint_every = 10 if local else 2000

  # Pure FSDP over every chip (16 on v5e-16, 8 on v5p-8).
  cfg.mesh = train_config.default_mesh()
  cfg.mesh.data = 1
  cfg.mesh.fsdp = -1
  cfg.mesh.tensor = 1

  # Multi-host: found automatically on TPU VMs; set these for other clusters (launch/README.md).
  cfg.distributed = distributed.default_config()

  cfg.search = ml_collections.ConfigDict()
  cfg.search.pop_size = 8 if local else 50
  # Narrowing the supernet per hidden choice (search.hidden_buckets, on by default: about 2x on
  # a CPU) slices FSDP-sharded arrays, which moves them between chips every arch; not measured on
  # a pod, so off here.
  cfg.search.hidden_buckets = False
  return cfg
