"""Kendall's tau of the proxy ranking plot against SciPy's, ties included."""

import numpy as np
import pytest
from scipy import stats

from elastic_jax.proxies.ranking import kendall_tau, ranking_figure


@pytest.mark.parametrize('seed', range(4))
def test_kendall_tau_matches_scipy(seed):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 6, size=37).astype(float)  # many ties
  y = x * (seed - 1.5) + rng.normal(size=37)
  assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_kendall_tau_extremes_and_bad_input():
  assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
  with pytest.raises(ValueError):
    kendall_tau([1, 2], [1, 2, 3])


def test_ranking_figure_titles_tau():
  fig = ranking_figure([1, 2, 3, 4], [4, 3, 1, 2], [1e5, 2e5, 3e5, 4e5], 'wpca', 'loss')
  assert 'Kendall tau = -0.667' in fig.axes[0].get_title()
