"""Zero-cost proxies: W-PCA and the baselines it is compared against, scored at initialisation.

  from elastic_jax import proxies
  cfg = proxies.default_config()                       # the `proxy` config section
  scores = proxies.score_archs(supernet, space, archs, batches, cfg)   # {name: float64[P]}
  scores = proxies.score_dense(exported_model, batches, cfg)           # {name: float}

Every proxy is oriented so that higher predicts a better (lower-loss) network. A masked
sub-network and its exported dense model get the same scores.

On a shared CPU, set OPENBLAS_NUM_THREADS=1 (and XLA_FLAGS=--xla_cpu_multi_thread_eigen=false):
LAPACK's eigensolver, which W-PCA and synaptic diversity call, otherwise spin-waits on busy cores
and ran up to 30x slower from one identical call to the next.
"""

from elastic_jax.proxies.config import (
    GRADIENT_PROXIES,
    PROXIES,
    ProxyConfig,
    check_names,
    default_config,
    proxy_config,
)
from elastic_jax.proxies.pca import pca_count, pca_count_linear, pca_counts
from elastic_jax.proxies.score import (
    as_records,
    population_scorer,
    prepare_batches,
    score_archs,
    score_dense,
)

__all__ = [
    'GRADIENT_PROXIES',
    'as_records',
    'PROXIES',
    'ProxyConfig',
    'check_names',
    'default_config',
    'pca_count',
    'pca_count_linear',
    'pca_counts',
    'population_scorer',
    'prepare_batches',
    'proxy_config',
    'score_archs',
    'score_dense',
]
