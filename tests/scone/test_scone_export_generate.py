"""An exported SCONE sub-network: its truncated table travels with it; generating from it (host
lookup, gathered rows only) gives the training-mode forward's greedy tokens exactly."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from elastic_jax import cli, data
from elastic_jax import export as export_lib
from elastic_jax import generate as gen
from elastic_jax.errors import UserError
from elastic_jax.scone import lookup
from elastic_jax.scone import table as table_lib
from elastic_jax.workdir import save_export
from tests.scone.test_scone_elastic import arch, corpus_and_fgrams, model, space


def export_subnetwork(m, s, fg, a, out):
  dense = export_lib.export(m, s.cfg, a)
  full = table_lib.Table(table_lib.precompute(m, fg, arch=a, batch=64), fg,
                         lookup.FgramIndex(fg), {}, n_used=int(a.fgrams))
  data_cfg = data.default_config()
  data_cfg.tokenizer = 'bytes'
  saved = save_export(dense, out, data_cfg, arch=a,
                      scone_table=full.truncated(int(a.hidden)))
  return dense, saved


def training_greedy(m, a, fg, prompt, new):
  """Greedy decoding by the supernet's training-mode forward: the whole sequence each step, its
  f-gram embeddings computed by the f-gram model from the host lookup's hits (right-padded to
  the final length, which a causal model's earlier positions never see: one compile)."""
  index = lookup.FgramIndex(fg)
  forward = jax.jit(lambda batch: m(batch, a)[0])
  ids = np.zeros((1, len(prompt) + new), np.int32)
  ids[0, :len(prompt)] = prompt
  used = 0
  for n in range(len(prompt), ids.shape[1]):
    hits = index.hits(ids)
    used += int(lookup.longest(hits, int(a.fgrams))[0, n - 1] >= 0)
    ids[0, n] = int(jnp.argmax(forward({'tokens': ids, 'fgram_hits': hits})[n - 1]))
  return ids[0, len(prompt):].tolist(), used


def test_generate_from_the_exported_table_equals_the_training_forward(tmp_path):
  docs, fg = corpus_and_fgrams()
  s, m = space(), model()
  a = arch(s, hidden=7, fgrams=17, fgram_layers=1, fgram_ffn=4)
  _, saved = export_subnetwork(m, s, fg, a, tmp_path / 'e')
  assert saved['scone']['fgrams'] == 17 and saved['scone']['table_mb'] == 17 * 7 * 4 / 1e6
  dense, config = export_lib.load(tmp_path / 'e')
  table = table_lib.load_for_export(tmp_path / 'e', dense, config)
  assert isinstance(table.rows_SD, np.memmap) and table.rows_SD.shape == (17, 7)
  assert dense.scone is None  # the export holds no f-gram model: only its table
  prompts = [[3, 1, 4, 1, 5, 3, 1], [2, 3, 1, 4]]  # different lengths: left padding
  got = gen.Generator(dense, table).generate(prompts, 11).tokens
  hits = 0
  for prompt, tokens in zip(prompts, got):
    want, used = training_greedy(m, a, fg, prompt, 11)
    assert tokens == want
    hits += used
  assert hits > 3  # the table was read while decoding, not only for the prompt
  # Without the table the exported model is another function (the table matters).
  plain = gen.Generator(dense).generate(prompts, 11).tokens
  assert plain != got


def test_exported_table_from_another_export_or_corrupt_is_one_line_exit_2(tmp_path, capsys):
  _, fg = corpus_and_fgrams()
  s, m = space(), model()
  a = arch(s, hidden=7, fgrams=17, fgram_layers=1, fgram_ffn=4)
  export_subnetwork(m, s, fg, a, tmp_path / 'e')
  export_subnetwork(model(5), s, fg, a, tmp_path / 'other')  # same shapes, other weights
  shutil.rmtree(tmp_path / 'e' / table_lib.EXPORT_DIR)
  shutil.copytree(tmp_path / 'other' / table_lib.EXPORT_DIR, tmp_path / 'e' / table_lib.EXPORT_DIR)
  dense, config = export_lib.load(tmp_path / 'e')
  with pytest.raises(UserError, match='built from another run.*export the sub-network again'):
    table_lib.load_for_export(tmp_path / 'e', dense, config)
  rows = tmp_path / 'other' / table_lib.EXPORT_DIR / table_lib.TABLE
  rows.write_bytes(rows.read_bytes()[:-9])
  for path in (tmp_path / 'e', tmp_path / 'other'):
    code = cli.main(['elastic-jax', 'generate', f'--model={path}', '--prompt=ab'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert ('another run' if path.name == 'e' else 'is corrupt') in err[0]
  shutil.rmtree(tmp_path / 'other' / table_lib.EXPORT_DIR)
  with pytest.raises(UserError, match='SCONE sub-network but its table .* missing'):
    table_lib.load_for_export(tmp_path / 'other', *export_lib.load(tmp_path / 'other'))


def test_bad_scone_input_at_the_command_line_is_one_line_exit_2(tmp_path, capsys, tiny_cfg):
  from elastic_jax.scone import job
  from elastic_jax.scone.config import scone_config
  from elastic_jax.workdir import init_supernet, save_config
  quick = f'--config={REPO}/configs/quickstart.py:tiny'
  code = cli.main(['elastic-jax', 'info', quick, '--config.scone.enabled=True',
                   '--config.scone.max_n=1'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and 'scone.max_n=1 is invalid' in err[0]
  # A workdir whose table was computed from other weights, then a corrupt one.
  cfg = tiny_cfg
  cfg.scone.enabled = True
  cfg.scone.update(max_n=3, min_count=3, num_fgrams=50, width=8, heads=2, ffn=11)
  w = tmp_path / 'w'
  save_config(w, cfg)
  fg = job.run_fgrams(scone_config(cfg.scone), cfg.data, w)
  tables = w / job.TABLE_DIR
  cfg.seed = 1
  other = init_supernet(cfg)
  table_lib.save(tables, table_lib.precompute(other, fg), fg, table_lib.fingerprint(other, fg))
  evaluate = ['elastic-jax', 'evaluate', f'--workdir={w}', '--arch=largest']
  code = cli.main(evaluate)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and 'built from another run' in err[-1] and 'Traceback' not in str(err)
  cfg.seed = 0
  own = init_supernet(cfg)  # the workdir's supernet (no checkpoint: the seeded initialisation)
  table_lib.save(tables, table_lib.precompute(own, fg), fg, table_lib.fingerprint(own, fg))
  rows = tables / table_lib.TABLE
  rows.write_bytes(rows.read_bytes()[:-5])
  code = cli.main(evaluate)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and 'table.npy is corrupt' in err[-1] and 'Traceback' not in str(err)


def test_a_table_index_swapped_or_corrupt_is_one_clear_error(tmp_path):
  _, fg = corpus_and_fgrams()
  rows = np.random.default_rng(0).normal(size=(len(fg), 5)).astype(np.float32)
  d = table_lib.save(tmp_path / 't', rows, fg, 'fp')
  np.testing.assert_array_equal(table_lib.load(d, 'fp').rows_SD, rows)
  swapped = fg.__class__(fg.tokens_SK[::-1].copy(), fg.lengths_S[::-1].copy(), fg.counts_S, 3)
  swapped.save(d / table_lib.INDEX)  # same row count, other f-grams
  with pytest.raises(UserError, match='holds other f-grams than the table was computed for'):
    table_lib.load(d, 'fp')
  (d / table_lib.INDEX).write_bytes(b'garbage')
  with pytest.raises(UserError, match=r'index .*index\.npz is missing or corrupt') as e:
    table_lib.load(d, 'fp')
  assert '\n' not in str(e.value)
