"""A SCONE training run: f-grams saved and reused on resume, the table tied to its final weights."""

import numpy as np
import pytest

from elastic_jax import data, evaluation
from elastic_jax.errors import UserError
from elastic_jax.scone import job, lookup
from elastic_jax.scone import table as table_lib
from elastic_jax.scone.config import scone_config
from elastic_jax.scone.fgrams import Fgrams
from elastic_jax.train.trainer import train
from elastic_jax.workdir import build_space, load_supernet


@pytest.mark.slow
def test_run_resumes_with_its_fgrams_and_writes_its_table(tiny_cfg, tmp_path):
  cfg = tiny_cfg
  cfg.scone.enabled = True
  cfg.scone.update(max_n=3, min_count=3, num_fgrams=97, width=8, heads=2, ffn=11)
  cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_every = 2, 2, 0
  w = tmp_path / 'w'
  train(cfg, w, progress=False)
  fgrams_file = w / job.FGRAMS
  first = Fgrams.load(fgrams_file)
  assert len(first) == 97 and first.max_n == 3
  stamp = fgrams_file.stat().st_mtime_ns
  cfg.train.steps = 4
  final = train(cfg, w, progress=False)  # resumes from step 2 with the saved f-grams
  assert fgrams_file.stat().st_mtime_ns == stamp
  model, step = load_supernet(cfg, str(w))
  assert step == 4
  table = table_lib.load(w / job.TABLE_DIR, table_lib.fingerprint(model, first))
  np.testing.assert_allclose(table.rows_SD, table_lib.precompute(model, first), atol=1e-6,
                             rtol=0)
  # Inference from the table (host lookup, gathered rows) gives the run's own validation loss,
  # for the largest sub-network (the saved table) and the smallest (a table for its width).
  space = build_space(cfg)
  batches = data.eval_batches(cfg.data)
  for label, arch in (('largest', space.largest()), ('smallest', space.smallest())):
    t = job.inference_table(model, scone_config(cfg.scone), cfg.data, w, arch)
    got = evaluation.evaluate(model, [t(b) for b in batches], arch)['loss']
    assert abs(got - final[f'eval/{label}/loss']) < 1e-5
  # The batches of the run carry the lookup of these f-grams.
  hits = job.batch_transform(first)({'tokens': first.tokens_SK[:, 1:].clip(0)})['fgram_hits']
  assert (lookup.longest(hits)[:, -1] >= 0).all()
  cfg.scone.num_fgrams = 50  # another run's settings in this workdir
  with pytest.raises(UserError, match=r'holds a run of another config \(scone.num_fgrams: 97 -> '
                                      r'50\)'):
    train(cfg, w, progress=False)
  # The f-grams the workdir holds are checked against the settings too (a file from another run).
  with pytest.raises(UserError, match="holds f-grams with .*scone.num_fgrams=50"):
    job.run_fgrams(scone_config(cfg.scone), cfg.data, w, write=False)
