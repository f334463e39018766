"""Checkpoints: nothing in them can run code when a run resumes."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import tiny_overrides as overrides
from orpo.cli import main
from orpo.training.checkpoint import load_plain


class RunsCode:
    """Unpickling this object runs a shell command (what a tampered checkpoint could do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng-0.pt"])
def test_resume_refuses_a_checkpoint_file_that_would_run_code(chat_model_dir, pairs_file, tmp_path, capsys, name):
    out = tmp_path / "run"
    args = overrides(chat_model_dir, pairs_file, out, max_steps=3, save_steps=2, eval_steps="null")
    assert main(["train", *args]) == 0
    capsys.readouterr()
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "payload": RunsCode(marker)}, out / "checkpoint-2" / name)
    code = main(["train", *args, "resume_from_checkpoint=latest", "max_steps=4"])
    err = capsys.readouterr().err
    assert code == 1 and not marker.exists()
    assert f"checkpoint-2/{name}: holds objects other than tensors and plain values" in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("orpo: error: ")


def test_checkpoint_states_are_plain(chat_model_dir, pairs_file, tmp_path):
    """What orpo writes loads under weights_only (tensors and plain values only), numpy's RNG state included."""
    out = tmp_path / "run"
    assert main(["train", *overrides(chat_model_dir, pairs_file, out, max_steps=2, save_steps=1, eval_steps="null")]) == 0
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt"):
        assert load_plain(out / "checkpoint-1" / name)
    assert load_plain(out / "checkpoint-1" / "rng-0.pt")["numpy"]["keys"].shape == (624,)


DRIVER = """
import os, signal, sys

mode, nth, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]


def dies_on_nth(original):
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*a, **k)
    return wrapped


if mode == "checkpoint":  # inside a checkpoint write, after its weights are on disk
    import torch
    torch.save = dies_on_nth(torch.save)
elif mode == "final":  # inside the final model's write, after its weights are on disk
    from transformers import PreTrainedTokenizerBase
    PreTrainedTokenizerBase.save_pretrained = dies_on_nth(PreTrainedTokenizerBase.save_pretrained)
from orpo.cli import main
sys.exit(main(args))
"""


def test_kill_9_at_any_moment_then_resume_ends_identical(chat_model_dir, pairs_file, tmp_path):
    """kill -9 inside a checkpoint write, at a random moment of training, and inside the final model's write,
    resuming after each: final weights, metrics.jsonl (times aside) and summary.json equal an uninterrupted run's."""
    import json
    import random
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    common = dict(max_steps=8, save_steps=2, eval_steps=4, gradient_accumulation_steps=2, save_total_limit=10, **{"lora.dropout": 0.1})

    def run(out, mode="none", nth=0, resume=False, kill_after=None):
        extra = ["resume_from_checkpoint=latest"] if resume else []
        cmd = [sys.executable, str(driver), mode, str(nth), "train", *overrides(chat_model_dir, pairs_file, out, **common), *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kill_after is not None:  # a random moment once training has logged a step
            log = out / "metrics.jsonl"
            start = log.read_text().count("\n") if log.is_file() else 0
            while proc.poll() is None and (not log.is_file() or log.read_text().count("\n") <= start):
                time.sleep(0.02)
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        return proc.returncode, err

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run(reference)[0] == 0
    assert run(killed, "checkpoint", 4)[0] == -signal.SIGKILL  # dies writing checkpoint-4 (its 4th torch.save)
    assert (killed / ".checkpoint-4.partial").is_dir() and not (killed / "checkpoint-4").exists()
    code, err = run(killed, resume=True, kill_after=random.Random(0).uniform(0.0, 0.2))
    assert code in (0, -signal.SIGKILL), err  # (a tiny run may finish first)
    assert run(killed, "final", 1, resume=True)[0] == -signal.SIGKILL  # dies writing final/
    assert (killed / ".final.partial").is_dir()
    assert run(killed, resume=True)[0] == 0

    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (reference, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("time", "tokens_per_second", "seconds_per_step")}  # noqa: E731
                       for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert strip(killed) == strip(reference)
    about_the_process = {"final_model", "wall_seconds", "tokens", "hardware", "versions"}  # this process's path, time, work
    summary = lambda d: {k: v for k, v in json.loads((d / "summary.json").read_text()).items() if k not in about_the_process}  # noqa: E731
    assert summary(killed) == summary(reference)
    assert not list(killed.glob(".*.partial"))
