"""Tokenizers: UTF-8 bytes, a byte-level BPE trained on the corpus, or any HF tokenizer.json.

All three expose the same special tokens (pad, bos, eos, mask, cls, sep), each a distinct id that
ordinary text never encodes to, so pipelines frame documents, GLUE pairs and masks the same way
whatever the tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers as hf

from elastic_jax import atomic
from elastic_jax.data import cache, sources
from elastic_jax.data.config import DataConfig
from elastic_jax.errors import UserError

_log = logging.getLogger(__name__)

SPECIAL_ROLES = ('pad', 'bos', 'eos', 'mask', 'cls', 'sep')
_BYTE_TOKENIZER_FORMAT = 'elastic_jax.byte_tokenizer'
# Our names first so a saved tokenizer reloads with the same ids; then the usual names, looked up
# only among the tokenizer's special tokens (a plain vocabulary entry could be produced by text).
_ROLE_CANDIDATES = {
    'pad': ('<|pad|>', '[PAD]', '<pad>', '<|padding|>'),
    'bos': ('<|bos|>', '<s>', '<bos>', '<|begin_of_text|>', '<|startoftext|>'),
    'eos': ('<|eos|>', '</s>', '<eos>', '<|endoftext|>', '<|end_of_text|>'),
    'mask': ('<|mask|>', '[MASK]', '<mask>'),
    'cls': ('<|cls|>', '[CLS]', '<cls>'),
    'sep': ('<|sep|>', '[SEP]', '<sep>'),
}
# Cap on the text a BPE is trained on: enough for stable merges, bounded time on huge corpora.
_BPE_TRAIN_MAX_CHARS = 200_000_000


@dataclasses.dataclass(frozen=True)
class WordBoundaries:
  """Per-id tables that let whole-word masking find words without decoding.

  A token starts a new word if `starts[id]`, or if the previous token `ends[prev]`, unless
  `continues[id]` (WordPiece '##' pieces).
  """

  starts: np.ndarray  # bool[V]: text begins with whitespace, or a special token
  ends: np.ndarray  # bool[V]: text ends with whitespace, or a special token
  continues: np.ndarray  # bool[V]: always continues the previous token's word


class Tokenizer:
  """The interface the pipelines and the model see: ids, special ids and text in, text out."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  mask_id: int
  cls_id: int
  sep_id: int
  lossless: bool  # decode(encode(text)) == text for every string
  kind: str

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    """int32[n] ids of `text`, no special tokens added."""
    raise NotImplementedError

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(int32[n] ids, int32[n, 2] character offsets): token i came from text[start:end]."""
    raise NotImplementedError

  def decode(self, ids: Any) -> str:
    """The text of `ids`, special tokens left out."""
    raise NotImplementedError

  def save(self, path: str | Path) -> Path:
    """Writes the tokenizer as one JSON file that `load_tokenizer` reads back."""
    raise NotImplementedError

  def word_boundaries(self) -> WordBoundaries:
    raise NotImplementedError

  @property
  def special_ids(self) -> dict[str, int]:
    return {role: getattr(self, f'{role}_id') for role in SPECIAL_ROLES}

  @functools.cached_property
  def is_special(self) -> np.ndarray:
    """bool[vocab_size]: ids that are special tokens (never masked, never sampled as noise)."""
    table = np.zeros(self.vocab_size, bool)
    table[self._all_special_ids()] = True
    return table

  @functools.cached_property
  def ordinary_ids(self) -> np.ndarray:
    """int32[n]: ids that text can encode to, for MLM's random replacements."""
    return np.flatnonzero(~self.is_special).astype(np.int32)

  def _all_special_ids(self) -> list[int]:
    return list(self.special_ids.values())

  def describe(self) -> dict[str, Any]:
    return {'kind': self.kind, 'vocab_size': self.vocab_size, 'lossless': self.lossless,
            **{f'{role}_id': i for role, i in self.special_ids.items()}}


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes are ids 0..255; the six special tokens follow (256..261). Lossless, no training."""

  kind = 'bytes'
  lossless = True
  vocab_size = 256 + len(SPECIAL_ROLES)
  pad_id, bos_id, eos_id, mask_id, cls_id, sep_id = range(256, 256 + len(SPECIAL_ROLES))

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8', errors='surrogatepass'), np.uint8).astype(np.int32)

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids = self.encode_array(text)
    # Each byte points at the whole character it is part of.
    widths = [len(c.encode('utf-8', errors='surrogatepass')) for c in text]
    char_of_byte = np.repeat(np.arange(len(text), dtype=np.int32), widths)
    return ids, np.stack([char_of_byte, char_of_byte + 1], axis=1).reshape(-1, 2)

  def decode(self, ids: Any) -> str:
    ids = np.asarray(ids, np.int64).ravel()
    ids = ids[(ids >= 0) & (ids < 256)]
    return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def save(self, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'format': _BYTE_TOKENIZER_FORMAT, 'version': 1}))
    return path

  def word_boundaries(self) -> WordBoundaries:
    space = np.zeros(self.vocab_size, bool)
    space[[ord(c) for c in ' \t\n\r\v\f']] = True
    space[256:] = True  # special tokens are words of their own
    return WordBoundaries(starts=space, ends=space.copy(), continues=np.zeros_like(space))


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers.Tokenizer`, with any missing special token appended to it."""

  def __init__(self, tokenizer: hf.Tokenizer, *, kind: str, lossless: bool,
               named: dict[str, str] | None = None):
    """`named`: role -> token text from a pre-trained model's tokenizer_config.json; those roles
    use the model's own tokens (two roles may share one, e.g. pad = eos, as the model was
    trained)."""
    tokenizer.no_padding()  # Pipelines pad and truncate themselves; a tokenizer.json may not.
    tokenizer.no_truncation()
    self._tokenizer = tokenizer
    self.kind = kind
    self.lossless = lossless
    specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    taken: set[int] = set()
    self.appended_roles: tuple[str, ...] = ()
    for role in SPECIAL_ROLES:
      found = tokenizer.token_to_id(named[role]) if role in (named or {}) else None
      if found is None:
        found = next((specials[name] for name in _ROLE_CANDIDATES[role]
                      if name in specials and specials[name] not in taken), None)
      if found is None:  # e.g. BERT has no bos/eos, GPT-2 only <|endoftext|>.
        name = _ROLE_CANDIDATES[role][0]
        tokenizer.add_special_tokens([hf.AddedToken(name, special=True, normalized=False)])
        found = tokenizer.token_to_id(name)
        self.appended_roles += (role,)
      setattr(self, f'{role}_id', found)
      taken.add(found)
    self._special_names = sorted(specials) + [_ROLE_CANDIDATES[r][0] for r in SPECIAL_ROLES]
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    encoding = self._tokenizer.encode(text, add_special_tokens=False)
    offsets = np.asarray(encoding.offsets, np.int32).reshape(-1, 2)
    return np.asarray(encoding.ids, np.int32), offsets

  def decode(self, ids: Any) -> str:
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).ravel()],
                                  skip_special_tokens=True)

  def save(self, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    self._tokenizer.save(str(path))
    return path

  def _all_special_ids(self) -> list[int]:
    added = self._tokenizer.get_added_tokens_decoder()
    return sorted({i for i, t in added.items() if t.special} | set(self.special_ids.values()))

  def word_boundaries(self) -> WordBoundaries:
    model = self._tokenizer.model
    prefix = getattr(model, 'continuing_subword_prefix', None) if isinstance(
        model, hf.models.WordPiece) else None
    size = self.vocab_size
    starts, ends, continues = (np.zeros(size, bool) for _ in range(3))
    for i in range(size):
      token = self._tokenizer.id_to_token(i)
      if token is None:
        continue
      if prefix is not None:  # WordPiece: the prefix alone marks continuation.
        continues[i] = token.startswith(prefix)
        starts[i] = not continues[i]
        continue
      text = self._tokenizer.decode([i], skip_special_tokens=False)
      starts[i] = text[:1].isspace()
      ends[i] = text[-1:].isspace()
    starts |= self.is_special
    ends |= self.is_special
    return WordBoundaries(starts=starts, ends=ends, continues=continues & ~self.is_special)


def load_tokenizer(data_cfg: Any) -> Tokenizer:
  """The tokenizer `data.tokenizer` names; trains and caches the BPE on first use."""
  cfg = DataConfig.from_config(data_cfg)
  if cfg.tokenizer == 'bytes':
    return ByteTokenizer()
  if cfg.tokenizer == 'bpe':
    return bpe_tokenizer(cfg, sources.open_corpus(cfg))
  return tokenizer_from_file(cfg.tokenizer)


def tokenizer_from_file(path: str | Path) -> Tokenizer:
  """Reads a tokenizer.json (HF, or one saved by ByteTokenizer), or a directory holding one."""
  path = Path(path).expanduser()
  if path.is_dir():
    path = path / 'tokenizer.json'
  if not path.is_file():
    raise UserError(f"data.tokenizer: {str(path)!r} does not exist; use 'bytes', 'bpe', or a path "
                    'to a tokenizer.json (or a directory containing one)')
  try:
    text = path.read_text(encoding='utf-8')
    payload = json.loads(text)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f'data.tokenizer: {path} is not a tokenizer JSON file ({e})') from e
  if isinstance(payload, dict) and payload.get('format') == _BYTE_TOKENIZER_FORMAT:
    return ByteTokenizer()
  try:
    tokenizer = hf.Tokenizer.from_str(text)
  except Exception as e:  # The Rust error type is not exported.
    raise UserError(f'data.tokenizer: {path} is not a Hugging Face tokenizer.json ({e})') from e
  is_byte_level = isinstance(tokenizer.pre_tokenizer, hf.pre_tokenizers.ByteLevel) and \
      isinstance(tokenizer.decoder, hf.decoders.ByteLevel) and tokenizer.normalizer is None
  return HFTokenizer(tokenizer, kind='hf', lossless=is_byte_level,
                     named=_configured_roles(path.parent / 'tokenizer_config.json'))


def _configured_roles(path: Path) -> dict[str, str]:
  """Special-token roles a transformers `tokenizer_config.json` names ({} if there is none)."""
  if not path.is_file():
    return {}
  try:
    config = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f'{path} is not valid JSON ({e})') from None
  roles = {}
  for role in SPECIAL_ROLES:
    value = config.get(f'{role}_token') if isinstance(config, dict) else None
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
      value = value.get('content')
    if isinstance(value, str) and value:
      roles[role] = value
  return roles


def bpe_tokenizer(cfg: DataConfig, corpus: sources.Corpus) -> Tokenizer:
  """The byte-level BPE for this corpus and vocab size, trained on its train split once."""
  key = cache.stable_key(corpus.name, cfg.bpe_vocab_size, hf.__version__.split('.')[0], 'bpe-v1')
  path = cfg.cache_root() / 'tokenizers' / f'bpe{cfg.bpe_vocab_size}-{key}' / 'tokenizer.json'
  with cache.build_lock(cfg.cache_root(), f'tokenizer-{key}'):
    if not path.is_file():
      _log.info('Training a %d-token BPE on %s', cfg.bpe_vocab_size, corpus.name)
      tokenizer = train_bpe(_training_texts(corpus), cfg.bpe_vocab_size)
      atomic.write_file(path, lambda tmp: tokenizer.save(str(tmp)))
  tokenizer = tokenizer_from_file(path)
  tokenizer.kind = 'bpe'
  return tokenizer


def train_bpe(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
  """A GPT-2-style byte-level BPE: lossless on any text, special tokens at ids 0..5."""
  tokenizer = hf.Tokenizer(hf.models.BPE())
  tokenizer.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      special_tokens=[_ROLE_CANDIDATES[role][0] for role in SPECIAL_ROLES],
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer=trainer)
  return HFTokenizer(tokenizer, kind='bpe', lossless=True)


def _training_texts(corpus: sources.Corpus) -> Iterator[str]:
  """The train split's text, in stored order, up to _BPE_TRAIN_MAX_CHARS."""
  train = corpus.train
  budget = _BPE_TRAIN_MAX_CHARS
  for start in range(0, len(train), 1024):
    for record in train.__getitems__(list(range(start, min(start + 1024, len(train))))):
      fields = corpus.reader(record)
      texts = fields[:1] if corpus.kind == 'lm' else fields[:2]
      for text in texts:
        if text:
          budget -= len(text)
          yield text
      if budget <= 0:
        return


# Special tokens each task writes into batches.
TASK_ROLES = {'causal_lm': ('bos', 'eos', 'pad'), 'mlm': ('cls', 'sep', 'mask', 'pad'),
              'glue': ('cls', 'sep', 'pad')}


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, task: str | None = None) -> None:
  """Raises UserError unless the model's embedding has a row for every tokenizer id.

  A larger model vocabulary is fine (padded to a friendly multiple); a smaller one would index out
  of range. With `task`, special tokens the tokenizer lacked and elastic_jax appended (ids past a
  pre-trained model's vocabulary) are allowed when the task never writes them.
  """
  appended = getattr(tokenizer, 'appended_roles', ())
  if task is not None and appended:
    needed = [r for r in TASK_ROLES.get(task, SPECIAL_ROLES)
              if r in appended and getattr(tokenizer, f'{r}_id') >= model_vocab_size]
    if needed:
      raise UserError(f'the tokenizer has no {"/".join(needed)} token within the model\'s '
                      f'{model_vocab_size} ids, which task {task!r} needs; name one in the '
                      'tokenizer_config.json beside tokenizer.json (e.g. "pad_token")')
    if model_vocab_size >= tokenizer.vocab_size - len(appended):
      return
  if model_vocab_size < tokenizer.vocab_size:
    raise UserError(f'the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids but '
                    f'model.vocab_size is {model_vocab_size}; set model.vocab_size to at least '
                    f'{tokenizer.vocab_size}')
