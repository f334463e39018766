"""Several processes (DDP over gloo, 2 CPU processes, the tiny model): the same weights and logged metrics as one
process with the same global batch, quiet non-main ranks, and a failure on one rank ending every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides as overrides

COMPARED = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm")

DRIVER = """
import os, sys
fail_rank, fail_call, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
if int(os.environ.get("RANK", "0")) == fail_rank:
    import orpo.train as loop
    real, calls = loop.orpo_loss, [0]

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == fail_call:
            raise RuntimeError(f"injected failure on rank {fail_rank}")
        return real(*a, **k)

    loop.orpo_loss = failing
from orpo.cli import main
sys.exit(main(args))
"""


def launch(processes: int, args: list[str], timeout: float = 300, driver: list[str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m orpo.cli ARGS` (the README's command), one thread each."""
    target = ["-m", "orpo.cli"] if driver is None else driver
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "adapter_model.safetensors")


@pytest.mark.parametrize("layout", ["packed", pytest.param("plain", marks=pytest.mark.slow)])  # 30 s each
def test_two_processes_train_what_one_does(chat_model_dir, pairs_file, tmp_path, layout):
    """2 processes x 2 pairs against 1 process x 4 pairs, gradient accumulation 2, LoRA without dropout (the
    masks would differ by rank): every logged training metric and every adapter weight within 1e-6."""
    common = dict(max_steps=3, gradient_accumulation_steps=2, eval_steps="null", eval_on_start="false", layout=layout)
    common["lora.dropout"] = 0.0
    one, two = tmp_path / "one", tmp_path / "two"
    single = launch(1, ["train", *overrides(chat_model_dir, pairs_file, one, per_device_train_batch_size=4, **common)])
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch(2, ["train", *overrides(chat_model_dir, pairs_file, two, per_device_train_batch_size=2, **common)])
    assert double.returncode == 0, double.stderr[-3000:]
    want, got = metrics(one), metrics(two)
    assert sorted(want) == sorted(got) == [1, 2, 3]
    for step in want:
        for key in COMPARED:
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-6), (step, key)
    weights_one, weights_two = adapter(one), adapter(two)
    assert weights_one.keys() == weights_two.keys()
    worst = max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one)
    moved = max((weights_one[k]).abs().max().item() for k in weights_one if "lora_B" in k)
    print(f"{layout}: max |adapter weight difference| {worst:.3g} (largest lora_B weight {moved:.3g})")
    assert moved > 0 and worst <= 1e-6, worst
    # the main process alone writes and prints: one table, one metrics file, no per-rank files
    assert double.stdout.count("preference accuracy") <= 1
    assert not list(two.glob("**/*rank1*")) and (two / "summary.json").is_file()


def test_a_failure_on_one_rank_ends_every_rank(chat_model_dir, pairs_file, tmp_path):
    """Rank 1 raises at its 3rd loss; rank 0 would wait in the next collective: both end, non-zero, in bounded
    time, and the error is printed."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = overrides(chat_model_dir, pairs_file, tmp_path / "run", max_steps=4, eval_steps="null", eval_on_start="false")
    start = time.monotonic()
    result = launch(2, ["train", *args], timeout=240, driver=[str(driver), "1", "3"])
    assert result.returncode != 0
    assert time.monotonic() - start < 200
    assert "injected failure on rank 1" in result.stderr


def test_a_launch_that_got_one_of_several_processes_says_so(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` runs one process with MASTER_ADDR set: orpo stops (exit 2)
    and names the commands that do start several; a plain run or a real one-process launch is not refused."""
    from orpo.config import ConfigError
    from orpo.train import check_launch

    for name in ("MASTER_ADDR", "WORLD_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    check_launch(1)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    check_launch(1)  # accelerate launch --cpu with one process: nothing asked for more
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ConfigError, match="started one process.*torchrun --standalone --nproc_per_node N"):
        check_launch(1)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1
    check_launch(1)
