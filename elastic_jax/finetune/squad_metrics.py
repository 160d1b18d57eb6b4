"""SQuAD exact match and F1 by the rules of the official evaluation scripts (v1.1 and v2.0).

Answers are compared after normalisation: lower case, punctuation removed, the articles a / an /
the removed, whitespace collapsed. A question scores the best over its gold answers; an
unanswerable one (v2.0) has the single gold answer '' and scores 1 only for an empty prediction.
Scores are fractions (the official scripts print them x 100). The two scripts differ only on
answers that normalise to nothing (e.g. 'the'): v1.1 keeps such gold answers and scores an empty
overlap F1 0; v2.0 drops them and scores two empty answers F1 1. `version` picks the rules.
"""

from __future__ import annotations

import collections
import re
import string

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r'\b(a|an|the)\b', re.UNICODE)


def normalize_answer(text: str) -> str:
  text = ''.join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return ' '.join(_ARTICLES.sub(' ', text).split())


def exact_match(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, version: str = 'v2.0') -> float:
  """Token-overlap F1 of the normalised answers; when either is empty, v2.0 gives 1 iff both
  are, v1.1 gives 0."""
  pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if (not pred_tokens or not gold_tokens) and version == 'v2.0':
    return float(pred_tokens == gold_tokens)
  common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred_tokens), common / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def evaluate(examples, predictions: dict[str, str], version: str = 'v2.0') -> dict[str, float]:
  """Mean exact match and F1 over `examples` (squad_data.Example) of `predictions` (id -> text;
  a missing id scores 0, as in the official scripts); 'score' is F1."""
  em_total = f1_total = 0.0
  for ex in examples:
    golds = [text for text, _ in ex.answers]
    if version == 'v2.0':
      golds = [g for g in golds if normalize_answer(g)] or ['']
    if ex.id not in predictions or not golds:
      continue
    pred = predictions[ex.id]
    em_total += max(exact_match(pred, g) for g in golds)
    f1_total += max(f1(pred, g, version) for g in golds)
  n = max(len(examples), 1)
  return {'exact_match': em_total / n, 'f1': f1_total / n, 'score': f1_total / n}
