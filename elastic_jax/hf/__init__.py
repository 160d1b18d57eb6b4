"""Hugging Face interop: pre-trained checkpoints in, sub-networks out.

  checkpoint.py  read / write Hugging Face directories (safetensors, sharded; never pickle)
  family.py      what a family module provides, shared checks
  gpt2.py, llama.py (Llama, Mistral, Qwen2, SmolLM2), bert.py   per-family weight maps
  layout.py      uniform per-layer sizes by exact zero padding (Hugging Face configs need one)
  convert.py     checkpoint <-> dense elastic_jax model
  space.py       the search space an imported model is the largest sub-network of
  importer.py    `elastic-jax import-hf`: a checkpoint (or GGUF file) becomes a workdir

`transformers` itself is needed only to read GGUF and by the tests and benches that use it as the
independent reference; importing safetensors and exporting need neither torch nor transformers.
"""
