"""`elastic-jax import-hf`: a Hugging Face checkpoint becomes a workdir whose supernet's largest
sub-network is the original model.

Layout of the workdir it writes (every other command accepts it):
  config.json        the experiment config: the model family read from the checkpoint, the space
                     derived from it (elastic_jax/hf/space.py), data / train / search sections
  pretrained/        the original as a native dense export (config.json, model.safetensors,
                     arch.json, the tokenizer files, hf_config.json); `train.init_from` points here,
                     so evaluate / search / export / proxy start from it until training writes
                     checkpoints, and training fine-tunes it
  import.json        what the import did (sizes, initialised and dropped tensors, timings)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import ml_collections

from elastic_jax import arch as arch_lib
from elastic_jax import data, proxies
from elastic_jax import export as export_lib
from elastic_jax.config import check_compatible, space_config
from elastic_jax.data.tokenizer import tokenizer_from_file
from elastic_jax.errors import UserError
from elastic_jax.hf import checkpoint, convert
from elastic_jax.hf import space as hf_space

PRETRAINED = 'pretrained'
REPORT = 'import.json'
HF_CONFIG = 'hf_config.json'


def original_hf_config(cfg: ml_collections.ConfigDict) -> dict:
  """The imported original's config.json, if `cfg` is an imported workdir's ({} otherwise): an
  export keeps its model type, token ids and dropout settings."""
  init_from = str(cfg.get('train', {}).get('init_from', ''))
  path = Path(init_from) / HF_CONFIG if init_from and not init_from.startswith('hf:') else None
  if init_from.startswith('hf:'):
    path = Path(init_from[3:]) / checkpoint.CONFIG_FILE
  if path is None or not path.is_file():
    return {}
  return json.loads(path.read_text())


def load_fix(directory: str | Path) -> str:
  """The advice for unreadable files of the dense model in `directory` (`export.load`'s `fix`):
  for the original an import wrote into a workdir (W/pretrained, beside W/import.json), to import
  it again, into a new workdir (the import refuses a non-empty one, and a rerun of compress
  resumes from W's import); for any other model, to re-export it."""
  directory = Path(directory).resolve()
  report = directory.parent / REPORT
  if directory.name != PRETRAINED or not report.is_file():
    return export_lib.REEXPORT
  try:
    source = json.loads(report.read_text())['source']
  except (OSError, ValueError, KeyError, TypeError):
    source = None
  flag = '--gguf' if source and Path(source).is_file() else '--model'
  source = source or 'DIR'
  return (f'{directory} is the model imported into {directory.parent}, not an export: import it '
          f'again, into a new workdir (`elastic-jax compress {flag}={source} --workdir=NEW_W`, '
          f'or `elastic-jax import-hf {flag}={source} --out=NEW_W`)')


def base_config(kind: str, max_len: int) -> ml_collections.ConfigDict:
  """Data, training, search and proxy sections for fine-tuning and searching an imported model
  on the embedded corpus (override any field with --config or --config.a.b=v)."""
  from elastic_jax.search import config as search_config
  from elastic_jax.train import config as train_config

  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.data = data.default_config()
  cfg.data.task = 'causal_lm' if kind == 'decoder' else 'mlm'
  cfg.data.seq_len = min(128, max_len)
  cfg.data.batch_size = 8
  cfg.data.eval_batches = 2  # 2,048 validation tokens per architecture: a pre-trained model
  # ranks stably on little text, and each evaluation runs the whole (large) model
  cfg.train = train_config.default_config()
  cfg.train.steps = 200  # a short supernet fine-tuning from the pre-trained weights
  cfg.train.learning_rate = 1e-4
  cfg.train.warmup_steps = 20
  cfg.mesh = train_config.default_mesh()
  cfg.proxy = proxies.default_config()
  cfg.search = search_config.default_config()
  cfg.search.pop_size = 16  # 16 x 8 generations: minutes for a 135M model on a CPU
  cfg.search.generations = 8
  cfg.search.latency_max = 4
  return cfg


def gguf_to_safetensors(gguf: str | Path, out: Path) -> Path:
  """Dequantises a GGUF file into a float safetensors checkpoint with `transformers` (the `hf`
  extra: transformers, torch, gguf)."""
  gguf = Path(gguf)
  if not gguf.is_file():
    raise UserError(f'--gguf {gguf} does not exist')
  try:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
  except ImportError as e:
    raise UserError(f'reading GGUF needs the hf extra (pip install -e ".[hf]"): {e}') from None
  try:
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  except (ValueError, OSError, KeyError, ImportError) as e:
    raise UserError(f'transformers could not read {gguf} as GGUF ({e})') from None
  model.save_pretrained(str(out), safe_serialization=True)
  tokenizer.save_pretrained(str(out))
  return out


def _merge_config(user: ml_collections.ConfigDict | None, kind: str,
                  max_len: int) -> ml_collections.ConfigDict:
  cfg = base_config(kind, max_len)
  cfg.hf = hf_space.default_config()
  if user is not None:
    for section in user:
      if section == 'model':
        raise UserError('the model section of an imported workdir comes from the checkpoint; '
                        'remove `model` from --config (set the space through `hf` or `space`)')
      if isinstance(user[section], ml_collections.ConfigDict) and section in cfg:
        cfg[section].update(user[section])
      else:
        cfg[section] = user[section]
  return cfg


def import_workdir(model_dir: str | Path | None, workdir: str | Path, *,
                   user_cfg: ml_collections.ConfigDict | None = None,
                   gguf: str | Path | None = None, log=print) -> dict:
  """Imports a Hugging Face directory (or a GGUF file) into a new workdir; returns the report."""
  start = time.perf_counter()
  workdir = Path(workdir)
  if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
    raise UserError(f'{workdir} already exists and is not empty; import into a new workdir')
  if (model_dir is None) == (gguf is None):
    raise UserError('pass exactly one of --model (a Hugging Face directory) and --gguf (a file)')
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix='.import-', dir=workdir.parent) as scratch:
    if gguf is not None:
      log(f'dequantising {gguf} with transformers')
      model_dir = gguf_to_safetensors(gguf, Path(scratch) / 'hf')
    model_dir = Path(model_dir)
    tokenizer_files = checkpoint.tokenizer_files(model_dir)  # before reading gigabytes
    imported = convert.load_dense(model_dir)
    model, shape = imported.model, imported.shape
    cfg = _merge_config(user_cfg, model.cfg.kind, model.cfg.max_len)
    cfg.model = ml_collections.ConfigDict(dataclasses.asdict(model.cfg))
    if 'space' not in cfg:
      cfg.space = hf_space.derive(shape, cfg.hf)
    cfg.hf.source = str(model_dir.resolve()) if gguf is None else str(Path(gguf).resolve())
    space = space_config(cfg.space)
    check_compatible(model.cfg, space)
    try:
      original = arch_lib.from_json(hf_space.original_arch(shape, space.num_layers), space)
    except UserError as e:
      raise UserError(f'the original model is not an architecture of the configured space ({e});'
                      ' include its sizes in the space') from None
    final = workdir.resolve()
    cfg.train.init_from = str(final / PRETRAINED)
    cfg.data.tokenizer = str(final / PRETRAINED / checkpoint.TOKENIZER_FILE)
    tokenizer = tokenizer_from_file(tokenizer_files[checkpoint.TOKENIZER_FILE])
    data.check_vocab(tokenizer, model.cfg.vocab_size, task=cfg.data.task)

    tmp = Path(tempfile.mkdtemp(prefix=f'.{workdir.name}.tmp-', dir=workdir.parent))
    try:
      export_lib.save(model, tmp / PRETRAINED, arch=original,
                      extra={'data': cfg.data.to_dict(),
                             'hf_model_type': imported.hf_config['model_type']},
                      files=tokenizer_files)
      (tmp / PRETRAINED / HF_CONFIG).write_text(json.dumps(imported.hf_config, indent=2) + '\n')
      report = {
          'source': cfg.hf.source, 'model_type': imported.hf_config['model_type'],
          'params': export_lib.param_count(model), 'shape': dataclasses.asdict(shape),
          'initialised': imported.initialised, 'not_imported': imported.not_imported,
          'space': cfg.space.to_dict(), 'seconds': round(time.perf_counter() - start, 2),
      }
      (tmp / REPORT).write_text(json.dumps(report, indent=2) + '\n')
      (tmp / 'config.json').write_text(cfg.to_json_best_effort(indent=2) + '\n')
      if workdir.exists():
        workdir.rmdir()  # empty (checked above)
      tmp.rename(workdir)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return report
