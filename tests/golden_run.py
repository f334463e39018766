"""The golden run: 5 steps on a tiny seeded model. Shared by the test and scripts/regen_golden.py."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import PAIRS, make_model_dir, tiny_overrides, write_jsonl

GOLDEN = Path(__file__).parent / "golden" / "tiny_5_steps.json"
KEYS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies", "grad_norm")


def golden_run(work: Path) -> dict[str, list[float]]:
    """Per-step metrics of a 5-step LoRA run (GA 2, dropout on) on the seeded tiny chat model, in the plain
    (reference) layout: dropout draws its masks per token, so the packed layout draws other masks."""
    from orpo.config import load_config
    from orpo.training.loop import train

    model_dir = make_model_dir(work / "model", chat=True, seed=0)
    data = write_jsonl(work / "pairs.jsonl", PAIRS * 4)
    out = work / "run"
    train(load_config(None, tiny_overrides(model_dir, data, out, max_steps=5, gradient_accumulation_steps=2, eval_steps="null", layout="plain")))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    return {key: [line[key] for line in steps] for key in KEYS}
