"""import-hf and export --format hf through the command line, and every bad input the issue names:
one line on stderr, exit 2, nothing half-written."""

from __future__ import annotations

import json

import hf_testing as H  # noqa: I001  (skips this module without the hf extra)
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from elastic_jax import cli
from elastic_jax import export as export_lib
from elastic_jax.config import LayerDims, ModelConfig, ModelDims
from elastic_jax.errors import UserError
from elastic_jax.hf import convert, importer
from elastic_jax.model.supernet import Model


def run(capsys, *args) -> tuple[int, str, str]:
  code = cli.main(['elastic-jax', *args])
  out, err = capsys.readouterr()
  return code, out, err


def one_line_error(code: int, err: str) -> str:
  assert code == 2
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, err
  return lines[0]


@pytest.fixture
def llama_dir(tmp_path):
  return H.save_model('llama', tmp_path / 'llama')


def test_import_evaluate_and_export_hf_round_trip(llama_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('ELASTIC_JAX_CACHE', str(tmp_path / 'cache'))
  w = tmp_path / 'W'
  code, out, err = run(capsys, 'import-hf', f'--model={llama_dir}', f'--out={w}')
  assert code == 0, err
  report = json.loads(out)
  assert report['model_type'] == 'llama' and report['initialised'] == []
  saved = json.loads((w / 'config.json').read_text())
  assert saved['space']['hidden'][-1] == 24 and saved['train']['init_from'].endswith('pretrained')
  code, out, err = run(capsys, 'evaluate', f'--workdir={w}', '--arch=largest')
  assert code == 0, err
  assert np.isfinite(json.loads(out)['loss'])
  code, out, err = run(capsys, 'export', f'--workdir={w}', '--arch=largest', '--format=hf',
                       f'--out={tmp_path / "hf"}')
  assert code == 0, err
  assert json.loads(out)['hf_model_type'] == 'llama'
  assert (tmp_path / 'hf' / 'tokenizer_config.json').is_file()
  # The largest sub-network of an untrained import is the original, weight for weight.
  original = load_file(str(llama_dir / 'model.safetensors'))
  exported = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  assert original.keys() == exported.keys()
  for k in original:
    np.testing.assert_array_equal(original[k], exported[k], err_msg=k)


def test_native_trained_family_exports_to_transformers(tmp_path, capsys, monkeypatch):
  """The quickstart's own (Llama-style) supernet: its smallest sub-network loads in transformers
  and computes the exported dense model's logits."""
  monkeypatch.setenv('ELASTIC_JAX_CACHE', str(tmp_path / 'cache'))
  code, out, err = run(capsys, 'export', '--config=configs/quickstart.py:tiny',
                       '--arch=smallest', '--format=hf', f'--out={tmp_path / "hf"}')
  assert code == 0, err
  code, out, err = run(capsys, 'export', '--config=configs/quickstart.py:tiny',
                       '--arch=smallest', f'--out={tmp_path / "native"}')
  assert code == 0, err
  dense, _ = export_lib.load(tmp_path / 'native')
  batch = {'tokens': np.random.RandomState(0).randint(0, 1024, (2, 9)).astype(np.int32),
           'attention_mask': np.ones((2, 9), np.int32)}
  ours = dense(H.ours(batch))
  assert H.max_scaled_diff(ours, H.reference_logits(tmp_path / 'hf', batch),
                           batch['attention_mask']) <= 1e-4


def _error(capsys, tmp_path, model_dir) -> str:
  code, _, err = run(capsys, 'import-hf', f'--model={model_dir}', f'--out={tmp_path / "W"}')
  assert not (tmp_path / 'W').exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.W')]  # no temporary left
  return one_line_error(code, err)


def test_pickle_only_checkpoint_is_refused(llama_dir, tmp_path, capsys):
  (llama_dir / 'model.safetensors').unlink()
  (llama_dir / 'pytorch_model.bin').write_bytes(b'not to be unpickled')
  line = _error(capsys, tmp_path, llama_dir)
  assert 'pytorch_model.bin' in line and 'never unpickles' in line and 'safetensors' in line


def test_unsupported_model_type_lists_the_supported(llama_dir, tmp_path, capsys):
  config = json.loads((llama_dir / 'config.json').read_text())
  (llama_dir / 'config.json').write_text(json.dumps({**config, 'model_type': 't5'}))
  line = _error(capsys, tmp_path, llama_dir)
  assert "'t5'" in line and 'bert, gpt2, llama, mistral, qwen2' in line


@pytest.mark.parametrize('field,value', [('rope_scaling', {'rope_type': 'linear', 'factor': 2.0}),
                                         ('hidden_act', 'gelu'), ('mlp_bias', True)])
def test_unsupported_config_value_is_refused_by_name(llama_dir, tmp_path, capsys, field, value):
  config = json.loads((llama_dir / 'config.json').read_text())
  config.pop('rope_parameters', None) if field == 'rope_scaling' else None
  (llama_dir / 'config.json').write_text(json.dumps({**config, field: value}))
  line = _error(capsys, tmp_path, llama_dir)
  assert field in line and 'not supported' in line


def test_missing_tokenizer(llama_dir, tmp_path, capsys):
  (llama_dir / 'tokenizer.json').unlink()
  assert 'tokenizer.json' in _error(capsys, tmp_path, llama_dir)


def test_missing_tensor_is_named(llama_dir, tmp_path, capsys):
  tensors = load_file(str(llama_dir / 'model.safetensors'))
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, str(llama_dir / 'model.safetensors'))
  assert 'model.layers.1.mlp.up_proj.weight' in _error(capsys, tmp_path, llama_dir)


@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_a_tensor_of_the_wrong_shape_is_named(family, tmp_path, capsys):
  """A tensor cut by a column is one line naming its module (a numpy reshape traceback)."""
  model_dir = H.save_model(family, tmp_path / family)
  tensors = load_file(str(model_dir / 'model.safetensors'))
  name = next(n for n in tensors if ('q_proj' in n or 'c_attn' in n) and n.endswith('weight'))
  tensors[name] = tensors[name][..., :-1].copy()
  save_file(tensors, str(model_dir / 'model.safetensors'))
  capsys.readouterr()  # transformers' progress bar
  line = _error(capsys, tmp_path, model_dir)
  assert repr(name.rsplit('.', 1)[0]) in line and 'config.json implies' in line, line


def test_import_into_a_non_empty_workdir_is_refused(llama_dir, tmp_path, capsys):
  (tmp_path / 'W').mkdir()
  (tmp_path / 'W' / 'mine.txt').write_text('keep me')
  code, _, err = run(capsys, 'import-hf', f'--model={llama_dir}', f'--out={tmp_path / "W"}')
  assert 'not empty' in one_line_error(code, err)
  assert (tmp_path / 'W' / 'mine.txt').read_text() == 'keep me'


def test_bottleneck_subnetwork_cannot_be_a_hf_model(tmp_path):
  cfg = ModelConfig(kind='encoder', vocab_size=31, max_len=8, norm_placement='post',
                    head_transform=True, output_bias=True)
  dims = ModelDims(hidden=12, head_dim=4, bottleneck_head_dim=4, layers=(
      LayerDims(('transformer',), 3, 3, 16), LayerDims(('bottleneck',), 2, 2, 8, inner=8)))
  from flax import nnx
  model = Model(cfg, dims, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match='bottleneck block, which no Hugging Face bert class'):
    convert.save_dense(model, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_family_without_hf_counterpart_says_why(tmp_path):
  from flax import nnx
  cfg = ModelConfig(kind='decoder', vocab_size=31, max_len=8, positions='none')
  dims = ModelDims(hidden=8, head_dim=4, bottleneck_head_dim=0,
                   layers=(LayerDims(('transformer',), 2, 2, 8),))
  with pytest.raises(UserError, match="model.positions='none'"):
    convert.save_dense(Model(cfg, dims, rngs=nnx.Rngs(0)), tmp_path / 'out')


def test_hf_init_from_in_a_config_equals_import(llama_dir):
  """train.init_from='hf:DIR' places the checkpoint as the sub-network of its own sizes."""
  import ml_collections

  from elastic_jax.hf import space as hf_space
  from elastic_jax.workdir import build_space, load_supernet
  imported = convert.load_dense(llama_dir)
  cfg = importer.base_config('decoder', 32)
  cfg.model = ml_collections.ConfigDict(
      {f: getattr(imported.model.cfg, f) for f in imported.model.cfg.__dataclass_fields__})
  cfg.space = hf_space.derive(imported.shape, hf_space.default_config())
  cfg.train.init_from = f'hf:{llama_dir}'
  space = build_space(cfg)
  supernet, step = load_supernet(cfg, None, space)
  assert step is None
  batch = H.padded_batch('llama')
  np.testing.assert_allclose(supernet(H.ours(batch), space.largest()),
                             imported.model(H.ours(batch)), rtol=1e-5, atol=1e-5)
