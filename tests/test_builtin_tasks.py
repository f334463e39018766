"""Tests for the demo's synthetic preference set (`orpo.data.builtin_tasks`); no model is loaded."""

from collections import Counter

import pytest

from orpo.data import builtin_tasks as tasks

KEYS = {"id", "family", "prompt", "chosen", "rejected", "answer"}


@pytest.fixture(scope="module")
def split():
    """A train/eval split large enough to hit every rejected-reply kind of every family."""
    return tasks.generate(num_train=600, num_eval=240, seed=0)


def test_rows_have_the_schema(split):
    """Every row has exactly the documented string fields, and chosen is the answer."""
    for row in split[0] + split[1]:
        assert set(row) == KEYS
        assert all(isinstance(value, str) and value for value in row.values())
        assert row["family"] in tasks.FAMILIES
        assert row["chosen"] == row["answer"]


def test_counts_and_family_balance(split):
    """Both splits have the requested size; family counts differ by at most one."""
    train, evals = split
    assert (len(train), len(evals)) == (600, 240)
    assert len(tasks.FAMILIES) >= 4
    for rows in (train, evals):
        counts = Counter(row["family"] for row in rows)
        assert set(counts) == set(tasks.FAMILIES)
        assert max(counts.values()) - min(counts.values()) <= 1
    uneven = Counter(row["family"] for row in tasks.generate(13, 0, 0)[0])
    assert sum(uneven.values()) == 13 and max(uneven.values()) - min(uneven.values()) <= 1


def test_deterministic_for_a_seed():
    """Same seed, same rows; another seed, other rows."""
    assert tasks.generate(60, 30, 7) == tasks.generate(60, 30, 7)
    assert tasks.generate(60, 30, 7) != tasks.generate(60, 30, 8)


def test_eval_set_does_not_depend_on_num_train():
    """Growing the train set leaves the eval set as it was."""
    assert tasks.generate(30, 24, 3)[1] == tasks.generate(300, 24, 3)[1]


def test_train_and_eval_are_disjoint(split):
    """No eval prompt appears in train, no prompt repeats, and ids are unique."""
    train, evals = split
    train_prompts = {row["prompt"] for row in train}
    eval_prompts = {row["prompt"] for row in evals}
    assert len(train_prompts) == len(train) and len(eval_prompts) == len(evals)
    assert not train_prompts & eval_prompts
    ids = [row["id"] for row in train + evals]
    assert len(set(ids)) == len(ids)


def test_chosen_differs_from_rejected(split):
    """A pair never prefers a reply over itself."""
    for row in split[0] + split[1]:
        assert row["chosen"] != row["rejected"]


def test_check_accepts_chosen_and_rejects_rejected(split):
    """The grader agrees with the labels on every generated row."""
    for row in split[0] + split[1]:
        assert tasks.check(row, row["chosen"]), row
        assert not tasks.check(row, row["rejected"]), row


def test_check_is_strict_to_the_format():
    """Whitespace and one trailing period are forgiven; anything else around the answer is not."""
    row = {
        "id": "x",
        "family": "arithmetic",
        "prompt": "What is 40 + 45? Reply with only the number.",
        "chosen": "85",
        "rejected": "84",
        "answer": "85",
    }
    for good in ("85", " 85\n", "85.", "85 .\n"):
        assert tasks.check(row, good), good
    for bad in ("The answer is 85.", "85\n\nBecause 40 + 45 = 85.", "850", "8", "", "85..", "$85"):
        assert not tasks.check(row, bad), bad
    upper = dict(row, family="format", chosen="APPLE", answer="APPLE")
    assert tasks.check(upper, "APPLE") and not tasks.check(upper, "Apple")


def test_every_prompt_states_its_format(split):
    """Each prompt ends with an explicit 'Reply with only ...' instruction."""
    for row in split[0] + split[1]:
        assert "Reply with only the" in row["prompt"], row["prompt"]


def test_replies_are_short(split):
    """Replies stay a few words long, which keeps CPU training sequences short."""
    for row in split[0] + split[1]:
        assert len(row["chosen"]) <= 16 and len(row["rejected"].split()) <= 5, row


def test_bad_requests_raise():
    """Negative counts and more items than a family holds are errors, named in the message."""
    with pytest.raises(ValueError, match="num_train"):
        tasks.generate(-1, 10, 0)
    with pytest.raises(ValueError, match="num_eval"):
        tasks.generate(10, -1, 0)
    with pytest.raises(ValueError, match="distinct items"):
        tasks.generate(len(tasks.FAMILIES) * 2000, 0, 0)
