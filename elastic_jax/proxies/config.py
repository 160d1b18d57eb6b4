"""The `proxy` config section: the ConfigDict users edit and the validated dataclass proxies read.

Every proxy is reported so that HIGHER predicts a BETTER network (lower loss), the sign each paper
uses for its own proxy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from elastic_jax.config import check_known_fields
from elastic_jax.errors import UserError

# Every proxy, in report order. 'wpca' and 'vpca': W-PCA (ICLR 2025); the rest are the baselines
# the W-PCA paper compares against (definitions and adaptations in `features.py`, `gradients.py`).
PROXIES = (
    'wpca',  # parameter count x V-PCA
    'vpca',  # sum over FFN layers of the PCA count of the first linear's pre-activations
    'params',  # parameter count (of the sub-network / dense model)
    'synaptic_diversity',  # sum over attention kernels of nuc(W) * nuc(dL/dW)  (TF-TAS)
    'synaptic_saliency',  # sum over FFN kernels of |W * dL/dW|  (TF-TAS)
    'snip',  # sum over all kernels of |W * dL/dW|
    'grad_norm',  # sum over all kernels of ||dL/dW||_F
    'synflow',  # sum over all kernels of |W| * dR/d|W|, R = linearised network's output sum
    'jacob_cov',  # NASWOT-v1 jacobian covariance of the outputs w.r.t. the embedding output
    'head_confidence',  # mean over active heads and tokens of the max attention probability
    'softmax_confidence',  # mean over tokens of the max output (vocabulary) probability
    'activation_distance',  # NASWOT log|K| over FFN activation sign patterns per sequence
)
# Proxies that back-propagate (the acceptance compares W-PCA's time with the cheapest of these).
GRADIENT_PROXIES = ('synaptic_diversity', 'synaptic_saliency', 'snip', 'grad_norm', 'synflow',
                    'jacob_cov')
_PADDING = ('exclude', 'include')
_BOTTLENECK = ('include', 'exclude')


def default_config() -> ml_collections.ConfigDict:
  """Returns the `proxy` section of an experiment config, every field commented."""
  c = ml_collections.ConfigDict()
  # W-PCA: explained-variance threshold of the PCA count, in (0, 1). The paper uses 0.99.
  c.eta = 0.99
  # Minibatches the proxies read: the first `num_batches` of those given (e.g. of
  # `data.eval_batches`). The W-PCA paper uses 3 minibatches of sequence length 128.
  c.num_batches = 3
  # False: each minibatch is scored on its own and the scores are averaged (our reading of the
  # paper's 3 minibatches; it does not say whether it averages or pools). True: the minibatches
  # are concatenated into one batch first, so one PCA sees all their tokens and the kernel
  # proxies see all their sequences.
  c.pool_batches = False
  # Which proxies `elastic-jax proxy` computes and prints, e.g. --config.proxy.names="('wpca',)";
  # () = all of elastic_jax.proxies.PROXIES. Unknown names are an error.
  c.names = ()
  # Padding tokens (segment_ids == 0): 'exclude' leaves them out of every statistic (PCA rows,
  # confidences, activation codes, jacobians; they carry no loss weight anyway); 'include' treats
  # them as ordinary tokens. The paper does not say; it scores padded GLUE batches.
  c.padding = 'exclude'
  # FFNs inside bottleneck (MobileBERT) blocks: 'include' counts them in V-PCA like any FFN (the
  # paper's space mixes both block types and sums over every FFN layer); 'exclude' counts only the
  # FFNs of transformer blocks.
  c.bottleneck_ffn = 'include'
  # Architectures evaluated together: 1 runs them one at a time in a scan, so removed layers and
  # FFN columns beyond the active width are skipped (fastest on CPU); > 1 vmaps that many (every
  # layer runs; better on accelerators).
  c.chunk = 1
  # Sequences per backward pass of the gradient proxies (SNIP, grad-norm, the synaptic proxies,
  # jacobian covariance, SynFlow): a minibatch is differentiated this many sequences at a time and
  # the gradients summed, which gives the same scores (the losses are sums over sequences) with
  # activation memory for this many sequences instead of the whole minibatch. 0 = the whole
  # minibatch in one pass (fastest on accelerators with memory to spare). Rounded down to a
  # divisor of the minibatch size.
  c.backward_batch = 8
  # jacob_cov: the constant k of -sum(log(lambda + k) + 1 / (lambda + k)) (Mellor et al.).
  c.jacob_k = 1e-5
  return c


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
  """A validated `proxy` config; see `default_config` for the meaning of each field."""

  eta: float = 0.99
  num_batches: int = 3
  pool_batches: bool = False
  names: tuple[str, ...] = ()
  padding: str = 'exclude'
  bottleneck_ffn: str = 'include'
  chunk: int = 1
  backward_batch: int = 8
  jacob_k: float = 1e-5

  def __post_init__(self):
    # Hashable (the config is a static argument of the jitted scorers).
    object.__setattr__(self, 'names', check_names(self.names or ()))
    if not 0.0 < float(self.eta) < 1.0:
      raise UserError(f'config field proxy.eta={self.eta!r} is invalid: must lie strictly '
                      'between 0 and 1 (the paper uses 0.99)')
    if int(self.num_batches) < 1:
      raise UserError(f'config field proxy.num_batches={self.num_batches!r} is invalid: must be '
                      '>= 1')
    if self.padding not in _PADDING:
      raise UserError(f'config field proxy.padding={self.padding!r} is invalid: allowed values '
                      f'are {list(_PADDING)}')
    if self.bottleneck_ffn not in _BOTTLENECK:
      raise UserError(f'config field proxy.bottleneck_ffn={self.bottleneck_ffn!r} is invalid: '
                      f'allowed values are {list(_BOTTLENECK)}')
    if int(self.chunk) < 1:
      raise UserError(f'config field proxy.chunk={self.chunk!r} is invalid: must be >= 1')
    if int(self.backward_batch) < 0:
      raise UserError(f'config field proxy.backward_batch={self.backward_batch!r} is invalid: '
                      'must be >= 0 (0 = the whole minibatch in one backward pass)')
    if not float(self.jacob_k) > 0.0:
      raise UserError(f'config field proxy.jacob_k={self.jacob_k!r} is invalid: must be > 0')

  @property
  def selected(self) -> tuple[str, ...]:
    """The proxies to compute: `names`, or all of them."""
    return tuple(self.names) or PROXIES


def check_names(names: Sequence[str]) -> tuple[str, ...]:
  """Validates proxy names (UserError naming the first unknown one); returns them as a tuple."""
  if isinstance(names, str):
    names = (names,)
  for name in names:
    if name not in PROXIES:
      raise UserError(f'unknown proxy {name!r}; known proxies: {", ".join(PROXIES)}')
  return tuple(names)


def proxy_config(cfg: Mapping[str, Any] | ProxyConfig | None = None) -> ProxyConfig:
  """Builds the validated config from a `proxy` ConfigDict (or mapping); missing fields default."""
  if cfg is None:
    return ProxyConfig()
  if isinstance(cfg, ProxyConfig):
    return cfg
  values = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  check_known_fields('proxy', values, {f.name for f in dataclasses.fields(ProxyConfig)})
  return ProxyConfig(**values)
