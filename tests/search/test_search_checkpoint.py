"""The search's own checkpoint (W/search/state.npz) when it cannot be read."""

import numpy as np
import pytest

from elastic_jax.errors import UserError
from elastic_jax.search.checkpoint import Progress


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_an_unreadable_search_checkpoint_is_one_clear_error(tmp_path, damage):
  path = tmp_path / 'state.npz'
  with open(path, 'wb') as f:
    np.savez(f, generation=np.int64(3), state_genomes=np.zeros((64, 16), np.int32))
  data = path.read_bytes()
  path.write_bytes({'truncated': data[:200], 'garbage': b'not a zip file at all',
                    'empty': b''}[damage])
  with pytest.raises(UserError, match='is not a readable search checkpoint .*; delete it or '
                     'set search.resume=False'):
    Progress.load(path)
