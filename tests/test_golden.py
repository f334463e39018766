"""Golden numbers: a seeded 5-step run must reproduce the stored per-step metrics."""

import json

import pytest

from golden_run import GOLDEN, golden_run


def test_tiny_run_matches_golden_numbers(tmp_path):
    expected = json.loads(GOLDEN.read_text())
    got = golden_run(tmp_path)
    for key, values in expected.items():
        assert got[key] == pytest.approx(values, rel=1e-4, abs=1e-6), key
