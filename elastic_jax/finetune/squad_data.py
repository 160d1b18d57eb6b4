"""SQuAD v1.1 / v2.0 questions, from the official JSON files or from tfds:squad (online).

A SQuAD JSON is {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}], "is_impossible" (v2.0)}]}]}]}. Every answer is checked
against its context (the text at answer_start must be the answer), so a misaligned file fails
once, here, rather than as silently wrong labels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from elastic_jax import data
from elastic_jax.data import sources
from elastic_jax.data.config import DataConfig
from elastic_jax.errors import UserError

VERSIONS = {'squad': 'v1.1', 'squad_v2': 'v2.0'}  # task name -> SQuAD version
FILES = {'train': 'train-{v}.json', 'validation': 'dev-{v}.json'}  # the official file names


@dataclasses.dataclass(frozen=True)
class Example:
  """One question. `answers`: (text, character start) pairs, () when unanswerable (v2.0)."""

  id: str
  question: str
  context: str
  answers: tuple[tuple[str, int], ...]

  @property
  def is_impossible(self) -> bool:
    return not self.answers


def _example(qid, question, context, answers, where: str) -> Example:
  checked = []
  for text, start in answers:
    start = int(start)
    if context[start:start + len(text)] != text:
      found = context.find(text)
      hint = f'it is at {found}' if found >= 0 else 'the context does not contain it'
      raise UserError(f'{where}: question {qid!r}: answer {text!r} is not at answer_start '
                      f'{start} of its context ({hint}); fix the file')
    checked.append((text, start))
  return Example(str(qid), question, context, tuple(checked))


def parse(payload: Any, where: str) -> list[Example]:
  """The questions of a decoded SQuAD JSON (v1.1 or v2.0), in file order."""
  if not isinstance(payload, dict) or not isinstance(payload.get('data'), list):
    raise UserError(f'{where} is not a SQuAD file: it has no "data" list of articles '
                    '({"data": [{"paragraphs": [{"context", "qas"}]}]})')
  out = []
  try:
    for article in payload['data']:
      for paragraph in article['paragraphs']:
        context = paragraph['context']
        for qa in paragraph['qas']:
          answers = [] if qa.get('is_impossible', False) else [
              (a['text'], a['answer_start']) for a in qa['answers']]
          out.append(_example(qa['id'], qa['question'], context, answers, where))
  except (KeyError, TypeError) as e:
    raise UserError(f'{where}: a SQuAD article, paragraph or question lacks {e} (expected '
                    'paragraphs / context / qas / id / question / answers)') from None
  if not out:
    raise UserError(f'{where} holds no questions')
  return out


def load_json(path: str | Path) -> list[Example]:
  path = Path(path)
  if not path.is_file():
    raise UserError(f'SQuAD file {path} does not exist')
  try:
    payload = json.loads(path.read_text(encoding='utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f'{path} is not valid JSON ({e})') from None
  return parse(payload, str(path))


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def from_tfds_records(records, where: str, limit: int = 0) -> list[Example]:
  """tfds:squad records (one per question, answers as parallel lists) as examples."""
  n = len(records) if not limit else min(limit, len(records))
  out = []
  for i in range(n):
    r = records[i]
    impossible = bool(r.get('is_impossible', False))
    answers = [] if impossible else list(zip([_text(t) for t in r['answers']['text']],
                                             r['answers']['answer_start']))
    out.append(_example(_text(r['id']), _text(r['question']), _text(r['context']), answers,
                        where))
  return out


def load_splits(squad_dir: str, task: str, cache_dir: str = '', limits=(0, 0)
                ) -> tuple[list[Example], list[Example]]:
  """(train, dev) questions of `task` ('squad' or 'squad_v2'): from `squad_dir` holding the
  official files (train-v1.1.json, dev-v1.1.json; -v2.0 for v2), or 'tfds' for tfds:squad."""
  version = VERSIONS[task]
  if squad_dir == 'tfds':
    cfg = data.default_config()
    cfg.source, cfg.cache_dir = f'tfds:squad/{version}', cache_dir
    cfg.tfds_text_key = 'context'  # the feature the TFDS path checks for
    corpus = sources.open_corpus(DataConfig.from_config(cfg))
    return (from_tfds_records(corpus.train, corpus.name, limits[0]),
            from_tfds_records(corpus.validation, corpus.name, limits[1]))
  root = Path(squad_dir).expanduser()
  splits = []
  for split, limit in zip(FILES, limits):
    path = root / FILES[split].format(v=version)
    if not path.is_file():
      raise UserError(f'{path} does not exist: finetune.squad_dir must hold the official SQuAD '
                      f'{version} files ({", ".join(f.format(v=version) for f in FILES.values())})'
                      " or be 'tfds'")
    examples = load_json(path)
    splits.append(examples[:limit] if limit else examples)
  return splits[0], splits[1]
