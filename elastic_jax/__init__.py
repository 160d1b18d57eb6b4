"""elastic_jax: elastic, weight-shared supernets for language-model architecture search."""

__version__ = "0.1.0"
