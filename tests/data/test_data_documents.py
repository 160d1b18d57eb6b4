"""Documents, pieces and the deterministic train/validation split."""

import random

import pytest

from elastic_jax.data import documents
from elastic_jax.errors import UserError


def test_split_documents_boundaries():
  text = 'a b\nc\n\n  \nd\r\n\ne\n'
  assert documents.split_documents(text, 'file') == [text]
  assert documents.split_documents(text, 'blank_line') == ['a b\nc', 'd', 'e']
  assert documents.split_documents(text, 'line') == ['a b', 'c', 'd', 'e']
  assert documents.split_documents(' \n\n\t\n', 'line') == []


@pytest.mark.parametrize('max_chars', [1, 7, 16, 1000])
def test_cut_pieces_is_lossless_and_bounded(max_chars):
  rng = random.Random(max_chars)
  text = ''.join(rng.choice('ab \n') for _ in range(503))
  pieces = documents.cut_pieces(text, max_chars)
  assert ''.join(pieces) == text
  assert all(0 < len(p) <= max_chars for p in pieces)
  # Cuts fall after a newline whenever the window holds one.
  for piece in pieces[:-1]:
    if '\n' in piece:
      assert piece.endswith('\n')


def test_document_pieces_flag_document_ends():
  pieces = documents.document_pieces('src', 'x' * 25, max_chars=10)
  assert [(p.bos, p.eos) for p in pieces] == [(True, False), (False, False), (False, True)]
  (single,) = documents.document_pieces('src', 'short', max_chars=10)
  assert single.bos and single.eos


def test_validation_split_is_fixed_share_by_content():
  pieces = [documents.Piece(f'doc {i}', True, True, 's') for i in range(1009)]
  held_out = documents.validation_indices(pieces, 0.1, 'test corpus')
  assert len(held_out) == round(1009 * 0.1)
  # The choice follows the text, not the order: shuffling the corpus holds out the same texts.
  shuffled = pieces[:]
  random.Random(0).shuffle(shuffled)
  held_out_shuffled = documents.validation_indices(shuffled, 0.1, 'test corpus')
  assert {pieces[i].text for i in held_out} == {shuffled[i].text for i in held_out_shuffled}
  assert documents.validation_indices(pieces, 0.0, 'test corpus') == set()


def test_split_pieces_partitions_the_corpus():
  pieces = [documents.Piece(f'doc {i}', True, True, 's') for i in range(50)]
  splits = documents.split_pieces(lambda: iter(pieces), 0.2, 'test corpus')
  train = [i for i, _ in splits['train']()]
  validation = [i for i, _ in splits['validation']()]
  assert len(validation) == 10
  assert sorted(train + validation) == list(range(50))


def test_empty_and_tiny_corpora_are_user_errors():
  with pytest.raises(UserError, match='has no text'):
    documents.validation_indices([], 0.1, 'my corpus')
  one = [documents.Piece('only', True, True, 's')]
  with pytest.raises(UserError, match='too few to hold out'):
    documents.validation_indices(one, 0.1, 'my corpus')
  assert documents.validation_indices(one, 0.0, 'my corpus') == set()
