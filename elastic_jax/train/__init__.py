"""Supernet training: objectives, sampling strategies, distillation, the train loop."""
