"""From window logits back to answer text in the original context (the standard post-processing).

Per example, over all its windows: the `n_best` highest start and end logits of each window give
candidate spans; a span is kept if both ends are context tokens, it starts in its max-context
window, ends after it starts and is at most `max_answer_len` tokens; the best has the highest
start + end logit. Its text is the context's characters from the first token's start offset to
the last token's end offset. v2.0: the no-answer score is the lowest [CLS] start + end logit over
the windows; the answer is '' when that exceeds the best span's score by more than
`null_threshold`.
"""

from __future__ import annotations

import numpy as np

from elastic_jax.finetune.squad_data import Example
from elastic_jax.finetune.squad_windows import Windows


def best_answers(examples: list[Example], windows: Windows, start_logits: np.ndarray,
                 end_logits: np.ndarray, *, n_best: int = 20, max_answer_len: int = 30,
                 allow_impossible: bool = False, null_threshold: float = 0.0
                 ) -> dict[str, str]:
  """id -> predicted answer text. `start_logits`, `end_logits`: [W, seq_len] floats."""
  best: dict[int, tuple[float, str]] = {}
  null: dict[int, float] = {}
  for w, e in enumerate(windows.example_index):
    e = int(e)
    start_W, end_W = start_logits[w], end_logits[w]
    where, is_max = windows.context_index[w], windows.max_context[w]
    null[e] = min(null.get(e, np.inf), float(start_W[0] + end_W[0]))
    starts = np.argsort(start_W, kind='stable')[::-1][:n_best]
    ends = np.argsort(end_W, kind='stable')[::-1][:n_best]
    for s in starts:
      if where[s] < 0 or not is_max[s]:
        continue
      for t in ends:
        if where[t] < 0 or t < s or t - s + 1 > max_answer_len:
          continue
        score = float(start_W[s] + end_W[t])
        if e not in best or score > best[e][0]:
          offsets = windows.offsets[e]
          text = examples[e].context[offsets[where[s], 0]:offsets[where[t], 1]]
          best[e] = (score, text)
  out = {}
  for e, ex in enumerate(examples):
    score, text = best.get(e, (-np.inf, ''))
    if allow_impossible and null.get(e, -np.inf) - score > null_threshold:
      text = ''
    out[ex.id] = text
  return out
