"""bench/gpu/run --dry-run: the GPU check's every part on this CPU with tiny shapes, so that a GPU machine is
never the first to run its code (argument handling, time caps, result files, both sides of the benchmark,
the CLI's train and merge)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "gpu" / "run"


def gpu_run(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(RUN), str(out), "--dry-run", "--work", str(out.parent / "work"), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def load_check():
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))  # where check.py finds parts.py
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_runs_every_part(tmp_path):
    """About 90 s: five benchmark processes, a nested pytest, `orpo train` and `orpo merge`."""
    out = tmp_path / "out"
    done = gpu_run(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["check.log", "log-bench-1b.txt", "log-bench-8b.txt", "log-budget.txt", "log-recipe.txt",
                     "log-tests.txt", "results.json", "results.md"]  # at most 8: what the device tool brings back
    record = json.loads((out / "results.json").read_text())
    parts = record["parts"]
    assert record["dry_run"] and list(parts) == ["tests", "bench-1b", "bench-8b", "recipe", "budget"]
    assert {p["status"] for p in parts.values()} == {"PASS"}
    assert parts["tests"]["details"]["counts"]["passed"] >= 2  # the bf16 parity, sdpa and 4-bit, ran on the CPU
    assert all(v["max_abs_mean_logp_diff"] < 5e-2 for v in parts["tests"]["details"]["parity"].values())
    for name in ("bench-1b", "bench-8b"):
        results = parts[name]["details"]
        assert {"orpo-packed", "orpo-plain", "trl"} <= {s for s, r in results.items() if "s_per_step" in r}
        assert results["orpo-flex"]["error"].startswith("skipped: flex_attention trains on CUDA only")
    assert parts["bench-1b"]["details"]["trl-liger"]["error"].startswith("skipped")
    assert parts["recipe"]["details"]["merge_check"]["passed"]
    assert len(parts["budget"]["details"]) == 2
    assert "packed = " in parts["bench-8b"]["figure"] and "x TRL's pairs/s" in parts["bench-8b"]["figure"]
    guesses = record["defaults"]
    assert len(guesses) == 2 and guesses[0].startswith("packed layout's attention kernel on CUDA")
    assert "Verdict" in guesses[1]  # the budget part measured: its verdict is given
    summary = done.stdout.split("== summary", 1)[1]
    assert all(f"{name:9s} PASS" in summary for name in parts)
    md = (out / "results.md").read_text()
    assert "| bench-8b | PASS |" in md and "## GPU defaults that are guesses today" in md and "| dry_8b_qlora | trl |" in md


def test_a_part_past_its_cap_is_stopped_and_a_part_without_time_is_skipped(tmp_path):
    out = tmp_path / "out"
    done = gpu_run(out, "--parts", "tests,recipe", "--cap", "tests=2", "--budget", "6", timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    parts = json.loads((out / "results.json").read_text())["parts"]
    assert parts["tests"]["status"] == "FAIL" and parts["tests"]["reason"] == "stopped at its 2 s cap"
    assert parts["tests"]["seconds"] < 10
    assert parts["recipe"]["status"] == "SKIPPED" and "left of the 6 s budget" in parts["recipe"]["reason"]
    assert "tests     FAIL(stopped at its 2 s cap)" in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--parts", "tests,nope"], "unknown parts ['nope']"),
    (["--cap", "tests"], "--cap tests: expected PART=SECONDS"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, message):
    check = load_check()
    with pytest.raises(SystemExit) as exc:
        check.main([str(tmp_path / "out"), "--dry-run", *args])
    assert message in str(exc.value) + capsys.readouterr().err


def test_without_cuda_the_real_run_refuses(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run([str(RUN), str(tmp_path / "out"), "--work", str(tmp_path / "work")], capture_output=True,
                          text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr
