"""SCONE (Yu et al., "Scaling Embedding Layers in Language Models", arXiv 2502.01637): embeddings
of frequent token n-grams (f-grams) computed by a small f-gram model during training and
precomputed into a host-memory table for inference, so the accelerator-resident model is unchanged.

  fgrams.py  extraction of the f-grams from a tokenised corpus (K - 1 exact, streamed scans)
  lookup.py  per-token longest match on the host (a batch transform of the data pipeline)
  model.py   the f-gram model (blocks of the model family, no token table of its own)
  table.py   precompute + memory-mapped table with its index and the run's fingerprint
  config.py  the `scone` config section
  job.py     SCONE in a training run (the run's f-grams, the table at the end)

The supernet (`elastic_jax.model.supernet.Model(..., scone=SconeConfig)`) substitutes the f-gram
embeddings for the token embeddings when a batch carries `fgram_hits` (training) or `fgram_emb`
and `fgram_ids` (inference from the table); without them it is the baseline model. The f-gram
count and the f-gram model's depth and FFN width are arch fields (`fgrams`, `fgram_layers`,
`fgram_ffn`; the space's `fgrams`, `fgram_layers`, `fgram_ffn` choices). An exported sub-network
carries its own truncated table (`table.save_for_export`). Each module's
docstring records the choices it makes where the paper leaves room; the README section "SCONE"
sums them up.
"""
