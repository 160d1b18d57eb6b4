"""ELM's dynamic modules (arXiv 2510.27037; the authors' companion code is the reference):
supernet training that changes its own search space.

- `growth`: PCA-guided FFN width growth (W-PCA's count of each layer-and-block's FFN activations).
- `head_pruning`: linear CKA between attention heads' outputs; redundant heads leave the space.
- `controller`: when a run measures, grows and prunes, its history in the workdir, resumption.
- `config`: the `train.dynamic` config section.

The arrays never change shape: they are allocated at the extent growth can reach
(elastic_jax/space_history.py) and a change of the space is a change of its limits, which the
training step takes as data (elastic_jax/space.py `Limits`), so it never retraces.
"""
