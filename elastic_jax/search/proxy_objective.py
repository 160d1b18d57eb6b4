"""Zero-cost proxies of `elastic_jax.proxies` as search objectives (computed for the whole
population inside the fitness's compiled call, with the supernet's state as an argument)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from elastic_jax import parallel
from elastic_jax.search.objectives import Context, Objective, register_objective


@dataclasses.dataclass(frozen=True)
class _ProxyFn:
  """A proxy objective's `fn`, equal to another exactly when it computes the same values (same
  proxy, same `proxy` settings): compiled programs are shared by equal settings only."""

  name: str
  cfg: Any  # proxies.ProxyConfig (a frozen dataclass)

  def __call__(self, ctx: Context) -> jax.Array:
    from elastic_jax.proxies import score as proxy_score  # noqa: PLC0415
    params = ctx.cost['params'].astype(jnp.float32)
    measures = proxy_score._measures((self.name,))
    if not measures:
      return params
    # Gathered over FSDP once per call, as the loss's population forward reads it
    # (`parallel.gathered`): every device then runs its own rows of the minibatches.
    state = parallel.gathered(ctx.data['state'], ctx.mesh)
    values = proxy_score._population(ctx.graphdef, state, ctx.archs,
                                     ctx.extra(self.name), cfg=self.cfg, measures=measures,
                                     widths=proxy_score.pca_widths(ctx.space, self.cfg))
    return proxy_score._assemble((self.name,), measures, values, params)[self.name]


@dataclasses.dataclass(frozen=True)
class _ProxyPrepare:
  """A proxy objective's `prepare`: its minibatches in the proxy's own format."""

  name: str
  cfg: Any

  def __call__(self, space, model, batches):
    from elastic_jax.proxies import score as proxy_score  # noqa: PLC0415
    del model
    return proxy_score.prepare_batches(batches, self.cfg, space.model.causal, (self.name,))


def proxy_objective(name: str, proxy_cfg=None) -> Objective:
  """A zero-cost proxy of `elastic_jax.proxies` as an objective (`proxy_cfg`: the `proxy` config
  section; None = its defaults): maximised (every proxy is oriented so that higher predicts a
  better network), computed for the whole population inside the fitness's compiled call, with
  the supernet's state as an argument. Uses the proxies package's population core. Objectives
  made from equal settings are equal (and share compiled programs); others are not.
  """
  from elastic_jax import proxies  # noqa: PLC0415

  cfg = proxies.proxy_config(proxy_cfg)
  return Objective(name, _ProxyFn(name, cfg), maximize=True, needs_model=True,
                   prepare=_ProxyPrepare(name, cfg),
                   description=f'zero-cost proxy {name} (elastic_jax.proxies, maximised)')


def register_proxies(names, proxy_cfg=None) -> None:
  """Registers the zero-cost proxies among objective `names` with the experiment's `proxy`
  section (replacing any registered with other settings)."""
  from elastic_jax.proxies import PROXIES  # noqa: PLC0415
  for name in names:
    if name in PROXIES and name != 'params':
      register_objective(proxy_objective(name, proxy_cfg), overwrite=True)
