"""Tests for orpo.training.layout: the shared-prompt sequence worked by hand, and packing properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orpo.model.fast.attention import allowed
from orpo.training.layout import (
    CHOSEN,
    PROMPT,
    REJECTED,
    Layout,
    pack,
    packed_batch,
    pair_length,
    plain_batch,
)


def record(p, c, r, start=10):
    """A pair with prompt/chosen/rejected of lengths p, c, r and distinct token ids."""
    ids = list(range(start, start + p + c + r))
    return {"prompt_ids": ids[:p], "chosen_ids": ids[p : p + c], "rejected_ids": ids[p + c :]}


def test_one_pair_by_hand():
    """Prompt a b c, chosen d e, rejected f g h: sequence a b c d e f g h, positions 0 1 2 3 4 3 4 5.

    Grid (plain layout's next-token positions, width max(3+2, 3+3) - 1 = 5):
      chosen row   cols 0..3 score b c d e  (nll_on_prompt: all four; response: cols 2, 3)
      rejected row cols 2..4 score f g h    (response only)
    Hidden states: col 0 <- a(0), 1 <- b(1), chosen 2 <- c(2), 3 <- d(3); rejected 2 <- c(2), 3 <- f(5), 4 <- g(6).
    Attention: f g h read a b c and each other causally, never d e.
    """
    rec = record(3, 2, 3)
    batch = packed_batch([[rec]], pad_id=0, nll_on_prompt=True)
    a, b, c, d, e, f, g, h = range(10, 18)
    assert batch.input_ids.tolist() == [[a, b, c, d, e, f, g, h]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert batch.role.tolist() == [[PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3]
    assert batch.response.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch.nll.tolist() == [[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert batch.source.tolist() == [0, 1, 2, 3, 2, 5, 6]  # prompt cols 0-1, chosen 2-3, rejected 2-4
    assert batch.target.tolist() == [b, c, d, e, f, g, h]
    assert batch.dest.tolist() == [0, 1, 2, 3, 7, 8, 9]  # flat (2, 5) grid
    assert batch.tokens == (3 + 2) + (3 + 3)
    seen = allowed(batch)[0, 0].int()  # (8, 8) rows = queries
    assert seen.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ]
    # A window of 2 positions: h (position 5) reads only positions 4 and 5, i.e. g and itself.
    assert allowed(batch, window=2)[0, 0, 7].int().tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


def test_without_prompt_nll_only_responses_are_scored():
    batch = packed_batch([[record(3, 2, 3)]], pad_id=0, nll_on_prompt=False)
    assert batch.nll.tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert batch.source.tolist() == [2, 3, 2, 5, 6]


def test_masks_equal_the_plain_layout():
    """Response and NLL masks, grid shape and token count equal those of data.collate's rows."""
    records = [record(3, 2, 5), record(1, 4, 1, 40), record(6, 1, 2, 70)]
    for nll_on_prompt in (True, False):
        plain = plain_batch(records, pad_id=0, nll_on_prompt=nll_on_prompt)
        packed = packed_batch([[records[0], records[1]], [records[2]]], pad_id=0, nll_on_prompt=nll_on_prompt)
        assert torch.equal(packed.response, plain.response) and torch.equal(packed.nll, plain.nll)
        assert packed.tokens == plain.tokens == sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in records)
        assert packed.input_ids.numel() < plain.input_ids.numel()


def test_two_pairs_in_a_row_do_not_see_each_other_and_padding_sees_only_padding():
    first, second, alone = record(2, 1, 1), record(1, 2, 1, 30), record(1, 1, 1, 50)
    batch = packed_batch([[first, second], [alone]], pad_id=0, nll_on_prompt=True)
    assert batch.input_ids.shape == (2, 8)
    assert batch.segment.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, -1, -1, -1, -1, -1]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 2, 0, 1, 2, 1]
    seen = allowed(batch)[:, 0]  # (2, 8, 8)
    assert not seen[0, 4:, :4].any() and not seen[0, :4, 4:].any()
    assert not seen[1, 3:, :3].any() and bool(seen[1, 3:, 3:].any(-1).all())  # every row sees something
    assert batch.attention_mask.tolist() == [[1] * 8, [1] * 3 + [0] * 5]


def test_pack_by_hand():
    """Lengths 9 5 4 3 2 with budget 10: rows hold at most 9 (the longest pair): [9] [5 4] [3 2];
    passes: [9] alone (2 x 9 > 10), then [5 4] (one row of 9), then [3 2] (5: 9 + 5 > 10 as two rows of 9)."""
    assert pack([9, 5, 4, 3, 2], 10) == [[[0]], [[1, 2]], [[3, 4]]]
    assert pack([9, 5, 4, 3, 2], 30) == [[[0], [1, 2], [3, 4]]]
    assert pack([9, 5, 4, 3, 2], 30, one_row=True) == [[[0, 1, 2, 3, 4]]]
    assert pack([40, 3], 10) == [[[0]], [[1]]]  # a pair over the budget gets a pass of its own
    assert pack([40, 3, 3, 3, 3], 10) == [[[0]], [[1, 2, 3]], [[4]]]  # rows never exceed the budget
    assert pack([], 10) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=40), st.integers(16, 200), st.booleans())
def test_pack_places_every_pair_once_within_budget(lengths, budget, one_row):
    plan = pack(lengths, budget, one_row)
    placed = sorted(i for rows in plan for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    capacity = budget if one_row else min(max(lengths), budget)
    for rows in plan:
        widths = [sum(lengths[i] for i in row) for row in rows]
        assert all(w <= capacity or len(row) == 1 for w, row in zip(widths, rows, strict=True))
        assert len(rows) * max(widths) <= budget or len(rows) == 1  # only a lone row may exceed the budget
    assert plan == pack(lengths, budget, one_row)  # deterministic


@pytest.mark.parametrize("kind", ["plain", "packed"])
def test_layout_batches_keep_every_pair_of_the_step(kind):
    groups = [[record(3, 2, 4), record(5, 1, 1, 30)], [record(2, 6, 3, 60)], [record(1, 1, 2, 90)]]
    batches = Layout(kind, pad_id=0, nll_on_prompt=True, max_tokens=12).batches(groups)
    assert sum(b.pairs for b in batches) == 4
    assert sum(b.tokens for b in batches) == sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for g in groups for r in g)
    if kind == "plain":
        assert [b.pairs for b in batches] == [2, 1, 1] and not any(b.packed for b in batches)
    else:
        assert all(b.packed for b in batches)
        assert all(b.input_ids.numel() <= 12 or b.pairs == 1 for b in batches)
        assert max(pair_length(r) for g in groups for r in g) == 11
