"""Exact search, masking and span continuation on a hand-made datastore."""

import torch

from nest_core.encoding import EncodedPassage
from nest_core.token_index import TokenIndex
from nest_core.types import Passage


def _encoded(keys, values, spans):
    return EncodedPassage(keys=torch.tensor(keys, dtype=torch.float16),
                          values=torch.tensor(values, dtype=torch.long),
                          char_spans=torch.tensor(spans, dtype=torch.int32))


def _index():
    a = _encoded([[0, 0], [1, 0], [2, 0]], [5, 6, 7], [[0, 1], [1, 2], [2, 3]])
    b = _encoded([[0, 3], [0, 4]], [8, 9], [[-1, -1], [0, 2]])  # row 3: title token
    return TokenIndex([Passage("a", "abc"), Passage("b", "xy")], [a, b], vocab_size=10)


def test_search_is_exact_sorted_and_skips_non_text_rows():
    idx = _index()
    found = idx.search(torch.tensor([[1.2, 0.1]]), k=10)
    assert found is not None
    # 4 active rows (row 3 is a title token), so k is clamped to 4 and all are finite
    assert found.rows.tolist() == [[1, 2, 0, 4]]
    assert torch.allclose(found.dist2[0], torch.tensor([0.05, 0.65, 1.45, 16.65]), atol=1e-4)


def test_values_beyond_vocab_are_never_retrieved():
    a = _encoded([[0.0], [1.0]], [3, 12], [[0, 1], [1, 2]])
    idx = TokenIndex([Passage("a", "ab")], [a], vocab_size=10)
    assert idx.num_active == 1


def test_mask_removes_rows_from_search_and_continuation():
    idx = _index()
    idx.mask([1])
    found = idx.search(torch.tensor([[1.0, 0.0]]), k=10)
    assert 1 not in found.rows.tolist()[0]
    assert idx.continuation(0, 5) == []  # row 1 masked: no copying the same text twice
    assert idx.continuation(1, 5) == [2]


def test_continuation_never_crosses_a_passage_boundary():
    idx = _index()
    assert idx.continuation(0, 10) == [1, 2]
    assert idx.continuation(0, 1) == [1]
    assert idx.continuation(2, 10) == []
    assert idx.continuation(3, 10) == [4]


def test_everything_masked_means_no_search():
    idx = _index()
    idx.mask(list(range(idx.num_rows)))
    assert idx.search(torch.zeros(1, 2), k=3) is None


def test_source_and_row_in_passage():
    idx = _index()
    assert idx.source(4) == (idx.passages[1], 0, 2)
    assert idx.row_in_passage(4) == 1


def test_distances_are_the_floats_of_the_expanded_square_and_follow_the_mask():
    # caught: a reordered (or fused) sum that rounds differently; the count or the mask of
    # active rows not refreshed after mask()
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(50, 16, generator=gen) * 3
    enc = EncodedPassage(keys=keys, values=torch.arange(50) % 7,
                         char_spans=torch.tensor([[i, i + 1] for i in range(50)],
                                                 dtype=torch.int32))
    idx = TokenIndex([Passage("a", "x" * 50)], [enc], vocab_size=10)
    q = torch.randn(4, 16, generator=gen) * 3
    expected = (idx.key_sq[None, :] - 2.0 * (q @ idx.keys.T)
                + (q * q).sum(-1, keepdim=True)).clamp_min(0.0)  # [4, 50]
    assert torch.equal(idx.distances(q), expected)
    idx.mask([3, 10, 11])
    assert idx.num_active == 47
    assert torch.equal(idx.distances(q)[:, [3, 10, 11]].isinf(), torch.ones(4, 3, dtype=bool))
    assert torch.equal(idx.distances(q)[:, :3], expected[:, :3])
