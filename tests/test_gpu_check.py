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
    """About 3 minutes: nine benchmark processes, a nested pytest, `orpo train` and `orpo merge`. The caps are the
    GPU's, sized for an H100; on 2 shared CPU cores a tiny dry-run part can take longer than its GPU cap (bench-1b
    52 s of 70 on a quiet host), so the test gives every part 5 minutes: it checks the plumbing, not the caps (the
    cap test below does)."""
    out = tmp_path / "out"
    caps = [arg for part in ("tests", "bench-1b", "bench-8b", "recipe", "budget") for arg in ("--cap", f"{part}=300")]
    done = gpu_run(out, "--budget", "1800", *caps, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["check.log", "log-bench-1b.txt", "log-bench-8b.txt", "log-budget.txt", "log-recipe.txt",
                     "log-tests.txt", "results.json", "results.md"]  # at most 8: what the device tool brings back
    record = json.loads((out / "results.json").read_text())
    parts = record["parts"]
    assert record["dry_run"] and list(parts) == ["tests", "bench-1b", "bench-8b", "recipe", "budget"]
    assert {p["status"] for p in parts.values()} == {"PASS"}
    assert parts["tests"]["details"]["counts"]["passed"] >= 2  # the bf16 parity, sdpa and 4-bit, ran on the CPU
    parity = {n.split("[")[1].rstrip("]"): c for n, c in parts["tests"]["details"]["cases"].items()
              if n.startswith("test_packed_matches_plain_in_bf16_on_the_gpu")}
    assert {k: c["outcome"] for k, c in parity.items()} == {"sdpa": "passed", "flex_attention": "skipped",
                                                           "sdpa-qlora": "passed"}
    assert parity["flex_attention"]["message"].endswith("needs CUDA")  # the one skip the dry run allows
    assert all(parity[k]["properties"]["max_abs_mean_logp_diff"] < 5e-2 for k in ("sdpa", "sdpa-qlora"))
    for name in ("bench-1b", "bench-8b"):
        results = parts[name]["details"]
        assert {"orpo-packed", "orpo-plain", "trl"} <= {s for s, r in results.items() if "s_per_step" in r}
        # orpo plan's prediction recorded beside each measurement (on the CPU: peak RSS; on a GPU also s/step)
        assert all(0 < r["plan"]["peak_gib"] < 3 * r["peak_rss_gib"] for s, r in results.items() if "s_per_step" in r)
        assert results["orpo-flex"]["error"].startswith("skipped: flex_attention trains on CUDA only")
    assert parts["bench-1b"]["details"]["trl-liger"]["error"].startswith("skipped")
    assert parts["recipe"]["details"]["merge_check"]["passed"]
    assert len(parts["budget"]["details"]) == 2
    assert "packed = " in parts["bench-8b"]["figure"] and "x TRL's pairs/s" in parts["bench-8b"]["figure"]
    guesses = record["defaults"]
    assert len(guesses) == 2 and guesses[0].startswith("packed layout's attention kernel on CUDA")
    assert "Verdict: undecided" in guesses[1] and "(1 paired step: no interval)" in guesses[1]  # 1 step: no noise known
    summary = done.stdout.split("== summary", 1)[1]
    assert all(f"{name:9s} PASS" in summary for name in parts)
    md = (out / "results.md").read_text()
    assert "orpo plan:" in md
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


# ---------------------------------------------------------------- the verdicts, on made-up results (no runs)


def load_bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "bench_train.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


PARITY = "test_packed_matches_plain_in_bf16_on_the_gpu"


def junit_xml(path: Path, outcomes: dict[str, str]) -> Path:
    """pytest's junit XML for the three parity tests, each recording its properties before its asserts (as
    tests/test_logps.py does): `outcomes` {kernel: passed, failed or skipped}, plus one engine test that passed."""
    cases = []
    for kernel, outcome in outcomes.items():
        body = ('<properties><property name="max_abs_mean_logp_diff" value="0.0004"/>'
                '<property name="max_grad_diff_share" value="0.01"/></properties>') if outcome != "skipped" else ""
        body += {"passed": "", "failed": '<failure message="AssertionError: Tensor-likes are not close!"/>',
                 "skipped": '<skipped type="pytest.skip" message="could not import \'bitsandbytes\'"/>'}[outcome]
        cases.append(f'<testcase classname="tests.test_logps" name="{PARITY}[{kernel}]">{body}</testcase>')
    cases.append('<testcase classname="tests.test_distributed" name="test_each_engine[ddp.yaml-packed]"/>')
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite>{"".join(cases)}</testsuite></testsuites>')
    return path


def made_up_check(tmp_path, outcomes: dict[str, str], times: dict[str, dict[str, list[float]]], dry: bool = False):
    """A Check whose tests part read `outcomes` from junit XML and whose benchmark parts timed `times`
    {part: {system: timed step seconds}} (each after one warm-up step, 10 GiB each)."""
    check = load_check()
    parts = sys.modules["parts"]
    c = check.Check(tmp_path, tmp_path, check.GPU, dry, dict(check.CAPS), check.BUDGET)
    tests = c.parts["tests"] = parts.Part("tests", 90)
    counts, cases = parts.junit(junit_xml(tmp_path / "tests.xml", outcomes))
    tests.details = {"counts": counts, "cases": cases}
    parts.tests_verdict(tests, 1 if "failed" in outcomes.values() else 0, dry)
    for name, systems in times.items():
        c.parts[name] = parts.Part(name, 60, "PASS", details={
            system: {"s_per_step": sorted(t)[len(t) // 2], "step_seconds": [[9.9, *t]], "peak_gpu_gib": 10.0}
            for system, t in systems.items()})
    return c, parts


ALL_PASS = {"sdpa": "passed", "flex_attention": "passed", "sdpa-qlora": "passed"}
SDPA = [1.00, 1.10, 0.95, 1.20, 1.05, 0.90, 1.15, 1.00]  # 8 steps of different lengths


def flex_times(ratio: float, wobble: float = 0.0) -> dict:
    """bench-1b and bench-8b with orpo-flex at `ratio` of orpo-packed's time per step, +- `wobble` step by step."""
    flex = [t * ratio * (1 + (wobble if i % 2 else -wobble)) for i, t in enumerate(SDPA)]
    return {name: {"orpo-packed": SDPA, "orpo-flex": flex} for name in ("bench-1b", "bench-8b")}


def test_a_failed_flex_parity_test_with_properties_keeps_sdpa(tmp_path):
    """tests/test_logps.py records its figures before its asserts: a failed test has properties too."""
    c, parts = made_up_check(tmp_path, {**ALL_PASS, "flex_attention": "failed"}, flex_times(0.5))
    tests = c.parts["tests"]
    assert tests.status == "FAIL" and tests.reason.startswith(f"failed: {PARITY}[flex_attention]")
    assert "flex_attention FAILED 4.0e-04" in tests.figure
    assert parts.defaults(c)[0].endswith("Verdict: keep sdpa (flex parity failed).")


def test_the_tests_part_does_not_pass_when_a_parity_test_was_skipped(tmp_path):
    c, parts = made_up_check(tmp_path, {**ALL_PASS, "sdpa-qlora": "skipped"}, {})
    tests = c.parts["tests"]
    assert tests.status == "FAIL" and tests.reason == "parity not run: sdpa-qlora (could not import 'bitsandbytes')"
    c, parts = made_up_check(tmp_path, {**ALL_PASS, "flex_attention": "skipped"}, flex_times(0.5))
    assert c.parts["tests"].status == "FAIL"
    assert parts.defaults(c)[0].endswith("Verdict: keep sdpa (flex parity was skipped).")
    c, _ = made_up_check(tmp_path, ALL_PASS, {})
    assert c.parts["tests"].status == "PASS" and "sdpa 4.0e-04, flex_attention 4.0e-04" in c.parts["tests"].figure


def test_the_dry_run_allows_only_the_skips_that_need_cuda(tmp_path):
    parts = made_up_check(tmp_path, ALL_PASS, {})[1]
    part = parts.Part("tests", 90)
    part.details = {"counts": {"passed": 1, "failed": 0, "skipped": 1}, "cases": {
        f"{PARITY}[sdpa]": {"outcome": "passed", "message": "", "properties": {"max_abs_mean_logp_diff": 1e-4}},
        f"{PARITY}[flex_attention]": {"outcome": "skipped", "message": "Skipped: needs CUDA", "properties": {}}}}
    parts.tests_verdict(part, 0, dry=True)
    assert part.status == "PASS"
    parts.tests_verdict(part, 0, dry=False)
    assert part.status == "FAIL" and part.reason == "parity not run: flex_attention (Skipped: needs CUDA)"


@pytest.mark.parametrize(("ratio", "wobble", "verdict"), [
    (0.80, 0.01, "make flex_attention the CUDA default."),
    (1.00, 0.01, "keep sdpa."),
    (0.94, 0.10, "undecided: flex's time is within the noise of 0.95x sdpa's"),  # 6% faster, +-10% per step
    (0.93, 0.00, "make flex_attention the CUDA default."),  # the same ratio at every step: no noise
])
def test_the_flex_verdict_is_decided_only_outside_the_noise(tmp_path, ratio, wobble, verdict):
    c, parts = made_up_check(tmp_path, ALL_PASS, flex_times(ratio, wobble))
    text = parts.defaults(c)[0]
    assert text.split("Verdict: ")[1].startswith(verdict), text
    assert f"bench-1b: flex {ratio:.2f}x (95% interval" in text and "over 8 paired steps" in text


def test_one_timed_step_decides_nothing(tmp_path):
    times = {name: {"orpo-packed": [1.0], "orpo-flex": [0.5]} for name in ("bench-1b", "bench-8b")}
    c, parts = made_up_check(tmp_path, ALL_PASS, times)
    text = parts.defaults(c)[0]
    assert "0.50x (1 paired step: no interval)" in text and "Verdict: undecided" in text


@pytest.mark.parametrize(("half", "twice", "verdict"), [
    (1.00, 0.90, "make 8192 (or its share of max_length) the default."),
    (1.02, 0.99, "keep the default."),
    (1.02, None, "undecided: a budget's time is within the noise"),  # twice at 0.96x, +-8% per step
])
def test_the_budget_verdict_is_decided_only_outside_the_noise(tmp_path, half, twice, verdict):
    wobbly = [t * 0.96 * (1.08 if i % 2 else 0.92) for i, t in enumerate(SDPA)]
    budget = {"orpo-packed@2048": [t * half for t in SDPA],
              "orpo-packed@8192": [t * twice for t in SDPA] if twice else wobbly}
    c, parts = made_up_check(tmp_path, ALL_PASS, {"bench-1b": {"orpo-packed": SDPA}, "budget": budget})
    text = parts.defaults(c)[1]
    assert text.split("Verdict: ")[1].startswith(verdict), text
    assert "time against the default's: 2048 " in text and "over 8 paired steps" in text


@pytest.mark.parametrize(("gpu", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA A10", 125.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA H100", None), ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_the_peak_is_the_card_present(monkeypatch, gpu, peak):
    monkeypatch.delenv("BENCH_PEAK_TFLOPS", raising=False)
    assert load_bench_train().peak_tflops(gpu) == peak


def test_mfu_uses_the_pcie_peak_and_no_peak_for_an_unknown_card(monkeypatch):
    monkeypatch.delenv("BENCH_PEAK_TFLOPS", raising=False)
    b = load_bench_train()
    s = b.SCENARIOS["gpu_8b_qlora"]
    pairs = [{"prompt_ids": [1] * 100, "chosen_ids": [2] * 200, "rejected_ids": [3] * 150}] * (s.batch * s.ga)
    runs = lambda gpu: [{"step_seconds": [9.0, 1.0, 1.0], "peak_rss_gib": 3.0, "wall_seconds": 20.0, "gpu": gpu,  # noqa: E731
                         "peak_gpu_gib": 12.0, "reserved_gpu_gib": 14.0}]
    pcie = b.summarise(s, "orpo-packed", runs("NVIDIA H100 PCIe"), pairs, 1, 2)
    flops = b.model_flops_per_step(s, "orpo-packed", pairs)
    assert pcie["peak_tflops"] == 756.0 and pcie["mfu"] == pytest.approx(flops / 1.0 / 756e12)
    unknown = b.summarise(s, "orpo-packed", runs("NVIDIA B300"), pairs, 1, 2)
    assert unknown["mfu"] is None and "unknown card 'NVIDIA B300': MFU not computed" in unknown["mfu_note"]
    parts = (load_check(), sys.modules["parts"])[1]
    assert "MFU not computed (unknown card)" in parts.ratio_figure({"orpo-packed": unknown})
    assert "unknown card" in b.table({"gpu_8b_qlora": {"orpo-packed": unknown}}, ["gpu_8b_qlora"])
    check = sys.modules["gpu_check"]
    assert check.mfu_basis("NVIDIA H100 PCIe") == (756.0, "MFU against NVIDIA H100 PCIe's 756 TFLOP/s dense bf16")
    assert check.mfu_basis("NVIDIA B300") == (None, "unknown card NVIDIA B300: MFU not computed")


def test_gpu_prepare_stops_with_one_line_above_56_mib(tmp_path, monkeypatch, capsys):
    """What travels is measured (bench/gpu/prepare.py's carried_bytes); 8 of the device tool's 64 MiB stay free."""
    spec = importlib.util.spec_from_file_location("gpu_prepare", ROOT / "bench" / "gpu" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    (tmp_path / "wheels").mkdir()
    (tmp_path / "tokenizer").mkdir()
    monkeypatch.setattr(prepare, "WHEELS", tmp_path / "wheels")
    monkeypatch.setattr(prepare, "TOKENIZER", tmp_path / "tokenizer")
    mib = 1024 * 1024
    monkeypatch.setattr(prepare, "carried_bytes", lambda: (2 * mib, 54 * mib))
    prepare.size_table()  # 56.0 MiB: at the line, not over it
    monkeypatch.setattr(prepare, "carried_bytes", lambda: (2 * mib, 54 * mib + 1))
    with pytest.raises(SystemExit) as stop:
        prepare.size_table()
    assert str(stop.value) == ("tree + .gpu is 56.0 MiB (2.0 tree, 54.0 .gpu), over 56 MiB: 64 MiB travels and 8 stay "
                               "free; drop a wheel or shrink the tree")
    assert "56.00 MiB  tree + .gpu (stops above 56 MiB; the device tool carries 64)" in capsys.readouterr().out
