"""Bad input gives one clear line (UserError, which the CLI maps to exit code 2)."""

import jax
import numpy as np
import pytest
from flax import nnx

from elastic_jax import proxies
from elastic_jax.config import ModelConfig, space_config
from elastic_jax.errors import UserError
from elastic_jax.model.supernet import Model
from elastic_jax.space import Space

CFG = ModelConfig(vocab_size=23, max_len=8)


def one_line_error(fn, *fragments):
  with pytest.raises(UserError) as info:
    fn()
  message = str(info.value)
  assert '\n' not in message, message
  for fragment in fragments:
    assert fragment in message, message
  return message


@pytest.fixture(scope='module')
def supernet():
  space = Space(CFG, space_config(dict(num_layers=1, hidden=[10, 14], heads=[2], head_dim=[3],
                                       ffn=[6, 10])), seq_len=7)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Model(CFG, space.cfg.supernet_dims(),
                                                           rngs=nnx.Rngs(0))))
  state = jax.tree.map(lambda s: np.full(s.shape, 0.1, s.dtype), state)
  return space, nnx.merge(graphdef, state), space.sample(jax.random.key(0), 2)


def batch(b=3, t=7, padded_from=None):
  seg = np.ones((b, t), np.int32)
  if padded_from is not None:
    seg[:, padded_from:] = 0
  return {'tokens': np.arange(b * t, dtype=np.int32).reshape(b, t) % 23, 'segment_ids': seg}


@pytest.mark.parametrize('eta', [0.0, 1.0, -0.5, 1.5])
def test_eta_outside_open_unit_interval(eta):
  one_line_error(lambda: proxies.proxy_config({'eta': eta}), 'proxy.eta', str(eta))
  one_line_error(lambda: proxies.ProxyConfig(eta=eta), 'proxy.eta')


def test_bad_config_fields():
  one_line_error(lambda: proxies.proxy_config({'etta': 0.9}), 'proxy.etta')
  one_line_error(lambda: proxies.proxy_config({'padding': 'drop'}), 'proxy.padding', 'exclude')
  one_line_error(lambda: proxies.proxy_config({'bottleneck_ffn': 'no'}), 'proxy.bottleneck_ffn')
  one_line_error(lambda: proxies.proxy_config({'num_batches': 0}), 'proxy.num_batches')
  one_line_error(lambda: proxies.proxy_config({'chunk': 0}), 'proxy.chunk')
  one_line_error(lambda: proxies.proxy_config({'backward_batch': -1}), 'proxy.backward_batch')
  # The default config section builds and validates.
  cfg = proxies.proxy_config(proxies.default_config())
  assert cfg.eta == 0.99 and cfg.selected == proxies.PROXIES


def test_unknown_proxy_name(supernet):
  space, model, archs = supernet
  one_line_error(lambda: proxies.proxy_config({'names': ['wpca', 'zen_nas']}), "'zen_nas'",
                 'wpca')
  one_line_error(lambda: proxies.score_archs(model, space, archs, [batch()] * 3,
                                             names=['w-pca']), "'w-pca'", 'known proxies')
  one_line_error(lambda: proxies.check_names('snip2'), "'snip2'")


def test_too_few_batches_tokens_or_sequences(supernet):
  space, model, archs = supernet
  one_line_error(lambda: proxies.score_archs(model, space, archs, [batch()] * 2, names=['wpca']),
                 'proxy.num_batches=3', 'only 2')
  # One real token per minibatch: no covariance.
  one_line_error(lambda: proxies.score_archs(model, space, archs, [batch(b=1, padded_from=1)] * 3,
                                             names=['vpca']), 'at least 2', 'tokens')
  # With padding included the same batch has 7 tokens and is fine.
  scores = proxies.score_archs(model, space, archs, [batch(b=1, padded_from=1)] * 3,
                               {'padding': 'include'}, names=['params'])
  assert scores['params'].shape == (2,)
  # Kernels over sequences need two sequences.
  for name in ('jacob_cov', 'activation_distance'):
    one_line_error(lambda n=name: proxies.score_archs(model, space, archs, [batch(b=1)] * 3,
                                                      names=[n]), name, '2', 'sequences')


def test_encoder_gradient_proxies_need_targets():
  encoder = ModelConfig(vocab_size=23, max_len=8, kind='encoder')
  one_line_error(lambda: proxies.prepare_batches([batch()] * 3, proxies.ProxyConfig(),
                                                 encoder.causal, ('snip',)), 'targets')
