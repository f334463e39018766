"""The GPU check's parts (bench/gpu/check.py runs them in order, each under its time cap) and the GPU
defaults they decide. Each part fills a Part: status PASS/FAIL/SKIPPED, a reason, a one-line figure, details."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from check import Check

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_train.py"
RECIPE = ROOT / "recipes" / "llama3-8b-orpo-qlora.yaml"
PARITY = "test_packed_matches_plain_in_bf16_on_the_gpu"  # tests/test_logps.py: bf16 parity (sdpa, flex, 4-bit)
T975 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18)  # Student's t, 97.5%, 1-12 df
WORDS = ("the model answer question data reason step value because first then result check small large time "
         "people water city write explain number list example help change great simple better world line").split()


@dataclass(frozen=True)
class Plan:
    """What the parts run: the GPU's real shapes, or tiny stand-ins on the CPU."""

    scenario_1b: str
    scenario_8b: str
    shape_8b: str
    systems_1b: tuple[str, ...]
    systems_8b: tuple[str, ...]
    warmup: int
    steps_1b: int  # timed steps per run: enough paired steps for a ratio's interval to resolve 5% (defaults)
    steps_8b: int
    default_budget: int  # max_tokens_per_batch the run gets by default (layout.make_layout)
    budget_rule: str  # how that default is set
    recipe_steps: int
    prompt_words: tuple[int, int]
    response_words: tuple[int, int]
    recipe_overrides: tuple[str, ...] = ()


ALL_1B = ("orpo-packed", "orpo-flex", "orpo-plain", "trl", "trl-liger")
ALL_8B = ("orpo-packed", "trl", "orpo-flex", "orpo-plain")  # by priority: a cut keeps the headline first
# A 1B step takes a fraction of a second and a run's start most of its time: 8 timed steps cost little there; an
# 8B QLoRA step takes about 2 s, four runs share bench-8b's cap, so 3. The dry run times 1 step (its verdicts are
# undecided: tests/test_gpu_check.py decides them on made-up steps) to stay inside its caps on 2 shared cores.
GPU = Plan("gpu_1b_lora", "gpu_8b_qlora", "llama3-8b-shape", ALL_1B, ALL_8B, 1, 8, 3, 2 * 2 * 1024, "2 x batch x max_length",
           3, (24, 380), (24, 480))
DRY = Plan("dry_1b_lora", "dry_8b_qlora", "tiny", ALL_1B, ALL_8B, 1, 1, 1, 96, "max_length, the CPU's rule", 2, (6, 30),
           (6, 24), ("max_length=96", "max_prompt_length=48"))


class OutOfTime(Exception):
    """A part ran past its deadline (Check.run stopped its command)."""


@dataclass
class Part:
    """One part's outcome, as results.json keeps it."""

    name: str
    cap: int
    status: str = "SKIPPED"  # PASS, FAIL or SKIPPED
    reason: str = ""
    figure: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    table: str = ""  # a benchmark's markdown table

    def line(self) -> str:
        why = f"({self.reason})" if self.reason else ""
        return f"{self.name:9s} {self.status}{why} {self.figure}".rstrip() + f"  [{self.seconds:.0f} s of {self.cap} s]"




def python() -> str:
    return sys.executable


def orpo_command() -> list[str]:
    """The `orpo` console script beside this Python (or on PATH: the carried wheel's), else the module."""
    here = Path(sys.executable).parent / "orpo"
    if here.is_file():
        return [str(here)]
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if (Path(folder) / "orpo").is_file():
            return [str(Path(folder) / "orpo")]
    return [python(), "-m", "orpo.cli"]




def junit(path: Path) -> tuple[dict[str, int], dict[str, dict]]:
    """Counts, and each test's outcome (passed, failed or skipped), message and recorded properties, from pytest's
    junit XML. Properties do not mean a pass: tests/test_logps.py records its figures before its asserts."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        outcome = "failed" if bad is not None else "skipped" if skip is not None else "passed"
        counts[outcome] += 1
        why = bad if bad is not None else skip
        cases[case.get("name", "?")] = {
            "outcome": outcome, "message": (why.get("message", "") if why is not None else "")[:200],
            "properties": {p.get("name"): float(p.get("value")) for p in case.iter("property")}}
    return counts, cases


def parity_cases(details: dict) -> dict[str, dict]:
    """The bf16 parity tests of a tests part's details, by kernel id (sdpa, flex_attention, sdpa-qlora)."""
    return {n.split("[")[-1].rstrip("]"): c for n, c in details.get("cases", {}).items() if n.startswith(PARITY)}


def parity_figure(cases: dict[str, dict]) -> str:
    """Each parity test's max |mean log-prob diff| when it passed, else its outcome (and the diff it recorded)."""
    bits = []
    for kernel, case in cases.items():
        diff = case["properties"].get("max_abs_mean_logp_diff")
        shown = f" {diff:.1e}" if diff is not None else ""
        bits.append(f"{kernel}{shown}" if case["outcome"] == "passed" else f"{kernel} {case['outcome'].upper()}{shown}")
    return ", ".join(bits)


def part_tests(c: Check, part: Part) -> None:
    xml, log = c.work / "tests.xml", c.out / "log-tests.txt"
    xml.unlink(missing_ok=True)
    rc = c.run([python(), "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rs", "-s",
                f"--junitxml={xml}", "tests/test_logps.py", "tests/test_distributed.py"],
               log, {"ORPO_GPU_DRY_RUN": "1"} if c.dry else None)
    if not xml.exists():
        part.status, part.reason = "FAIL", f"pytest exit {rc}, no report"
        return
    counts, cases = junit(xml)
    part.details = {"counts": counts, "cases": cases}
    tests_verdict(part, rc, c.dry)


def tests_verdict(part: Part, rc: int, dry: bool) -> None:
    """PASS only when no test failed and every parity test passed: one skipped on the GPU (bitsandbytes missing,
    say) leaves a default undecided, so it FAILs the part. The dry run skips flex_attention (CUDA only)."""
    counts, parity = part.details["counts"], parity_cases(part.details)
    part.figure = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
                   + (f"; bf16 parity max |mean log-prob diff| (limit 5e-2): {parity_figure(parity)}" if parity else ""))
    failed = [n for n, case in part.details["cases"].items() if case["outcome"] == "failed"]
    not_run = {k: case["message"] for k, case in parity.items()
               if case["outcome"] == "skipped" and not (dry and "needs CUDA" in case["message"])}
    if failed or rc not in (0, 5):
        part.status, part.reason = "FAIL", (f"failed: {', '.join(failed)}" if failed else f"pytest exit {rc}")[:300]
    elif not_run:
        part.status, part.reason = "FAIL", "parity not run: " + "; ".join(f"{k} ({m})" for k, m in not_run.items())[:300]
    elif not any(case["outcome"] == "passed" for case in parity.values()):
        part.status, part.reason = "FAIL", "no parity test ran"
    else:
        part.status = "PASS"


def bench(c: Check, part: Part, name: str, scenario: str, systems: list[str]) -> dict:
    """bench_train.py for `systems` on `scenario`; its results so far (also after a cut)."""
    out = c.work / name
    out.with_suffix(".json").unlink(missing_ok=True)
    steps = c.plan.steps_8b if scenario == c.plan.scenario_8b else c.plan.steps_1b
    try:
        rc = c.run([python(), BENCH, "--scenarios", scenario, "--systems", ",".join(systems), "--warmup", c.plan.warmup,
                    "--steps", steps, "--rounds", 1, "--timeout", int(c.deadline - time.monotonic()) + 1,
                    "--out", out, "--cache", c.work / "cache"], c.out / f"log-{name}.txt")
    finally:  # also after a cut: bench_train.py rewrites its results after every run
        path, md = out.with_suffix(".json"), out.with_suffix(".md")
        part.details = json.loads(path.read_text())["results"].get(scenario, {}) if path.exists() else {}
        part.table = md.read_text().split("\n\n", 2)[-1].strip() if md.exists() else ""
    failed = {s: r["error"] for s, r in part.details.items() if "error" in r and not r["error"].startswith("skipped")}
    part.status = "FAIL" if rc or failed or len(part.details) < len(systems) else "PASS"
    if failed:
        part.reason = "; ".join(f"{s}: {e[:120]}" for s, e in failed.items())
    return part.details


def ratio_figure(results: dict) -> str:
    """orpo packed against TRL, and flex against sdpa, in one line."""
    ok = {s: r for s, r in results.items() if "error" not in r}
    bits = []
    for s, r in ok.items():
        mem = f", {r['peak_gpu_gib']:.1f} GiB" if "peak_gpu_gib" in r else f", RSS {r['peak_rss_gib']:.2f} GiB"
        mfu = f", MFU {100 * r['mfu']:.0f}%" if r.get("mfu") else ", MFU not computed (unknown card)" if r.get("mfu_note") else ""
        bits.append(f"{s} {r['s_per_step']:.2f} s/step{mem}{mfu}")
    if "orpo-packed" in ok and "trl" in ok:
        p, t = ok["orpo-packed"], ok["trl"]
        key = "peak_gpu_gib" if "peak_gpu_gib" in p else "peak_rss_gib"
        bits.insert(0, f"packed = {t['s_per_step'] / p['s_per_step']:.2f}x TRL's pairs/s at {p[key] / t[key]:.2f}x its memory")
    return "; ".join(bits)


def part_bench(c: Check, part: Part, name: str, scenario: str, systems: tuple[str, ...]) -> None:
    try:
        bench(c, part, name, scenario, list(systems))
    finally:  # a cut part still shows the runs that finished
        part.figure = ratio_figure(part.details)


def recipe_rows(plan: Plan, n: int, seed: int = 0) -> list[dict]:
    """orpo-dpo-mix-like rows: a user turn, then chosen and rejected replies as whole message lists."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."

    rows = []
    for _ in range(n):
        user = [{"role": "user", "content": text(*plan.prompt_words)}]
        rows.append({"source": "gpu-check", "prompt": user[0]["content"],
                     "chosen": user + [{"role": "assistant", "content": text(*plan.response_words)}],
                     "rejected": user + [{"role": "assistant", "content": text(*plan.response_words)}]})
    return rows


def part_recipe(c: Check, part: Part) -> None:
    log, plan = c.out / "log-recipe.txt", c.plan
    cache = c.work / "cache"
    code = f"import sys; sys.path.insert(0, {str(BENCH.parent)!r}); import bench_train as b; from pathlib import Path; " \
           f"print(b.random_llama_dir(Path({str(cache)!r}), {plan.shape_8b!r}))"
    made = time.monotonic()
    if c.run([python(), "-c", code], log):
        raise RuntimeError("could not make the random model (log-recipe.txt)")
    model_seconds = round(time.monotonic() - made, 1)  # a few seconds when bench-8b made it already
    model = cache / plan.shape_8b
    data = c.work / "recipe.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recipe_rows(plan, 8 * plan.recipe_steps + 4)))
    run_dir, merged = c.work / "recipe-run", c.work / "recipe-merged"
    try:
        train_and_merge(c, part, model, data, run_dir, merged, log)
    finally:
        part.details["model_seconds"] = model_seconds
        for path in (merged, run_dir):  # 16 GB each for the 8B shape: the disk is 64 GB
            subprocess.run(["rm", "-rf", str(path)], check=False)


def train_and_merge(c: Check, part: Part, model: Path, data: Path, run_dir: Path, merged: Path, log: Path) -> None:
    """`orpo train` with the recipe, then `orpo merge --dtype bf16`; the figure grows as each one finishes."""
    for path in (merged, run_dir):  # a rerun starts clean (a run folder would be resumed or refused)
        subprocess.run(["rm", "-rf", str(path)], check=False)
    started = time.monotonic()
    rc = c.run([*orpo_command(), "train", RECIPE, f"model.name_or_path={model}", f"data.path={data}", "data.num_samples=null",
                "data.test_size=4", f"max_steps={c.plan.recipe_steps}", f"output_dir={run_dir}", "report_to=[]",
                *c.plan.recipe_overrides], log)
    part.details = {"train_seconds": round(time.monotonic() - started, 1)}
    if rc:
        part.status, part.reason = "FAIL", f"orpo train exit {rc}"
        return
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x["seconds_per_step"] for x in lines if "seconds_per_step" in x]
    part.details |= {"seconds_per_step": steps, "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
                     "after": summary.get("after", {})}
    planned = [x for x in log.read_text(errors="replace").splitlines() if "memory plan: " in x]  # orpo train's pre-check on CUDA
    part.details["memory_plan"] = planned[-1].split("memory plan: ", 1)[1] if planned else None
    gpu = f", peak GPU {summary['peak_gpu_memory_gib']:.1f} GiB" if summary.get("peak_gpu_memory_gib") else ""
    if part.details["memory_plan"]:
        gpu += f" (orpo plan: {part.details['memory_plan'].split(' GiB per GPU')[0]} GiB with context and slack)"
    part.figure = (f"train {summary['steps']} steps in {part.details['train_seconds']:.0f} s "
                   f"({statistics.median(steps):.2f} s/step{gpu})")
    started = time.monotonic()
    rc = c.run([*orpo_command(), "merge", run_dir, "--dtype", "bf16", "--out", merged], log)
    check = json.loads((merged / "orpo_merge.json").read_text()) if (merged / "orpo_merge.json").exists() else {}
    part.details |= {"merge_seconds": round(time.monotonic() - started, 1), "merge_check": check}
    part.figure += (f"; merge + check {part.details['merge_seconds']:.0f} s: max |logit diff| {check['max_abs_diff']:.2e} "
                    f"(tolerance {check['tolerance']:.2e})" if check else "; merge wrote no check")
    part.status = "PASS" if rc == 0 and check.get("passed") else "FAIL"
    if part.status == "FAIL":
        part.reason = f"orpo merge exit {rc}"


def part_budget(c: Check, part: Part) -> None:
    half, twice = c.plan.default_budget // 2, c.plan.default_budget * 2
    try:
        bench(c, part, "budget", c.plan.scenario_1b, [f"orpo-packed@{half}", f"orpo-packed@{twice}"])
    finally:
        part.figure = "; ".join(f"{s.split('@')[1]} tokens {r['s_per_step']:.2f} s/step"
                                for s, r in part.details.items() if "error" not in r)


# ---------------------------------------------------------------- the guesses, and what decides them


def measured(c: Check, name: str, system: str) -> dict | None:
    part = c.parts.get(name)
    r = part.details.get(system) if part and isinstance(part.details, dict) else None
    return r if r and "error" not in r else None


@dataclass(frozen=True)
class Ratio:
    """One run's time per step over another's, from the steps both timed on the same pairs."""

    value: float  # the geometric mean of the per-step ratios
    low: float  # its 95% interval (0 to infinity from a single step)
    high: float
    steps: int

    def text(self) -> str:
        spread = (f"95% interval {self.low:.2f}-{self.high:.2f} over {self.steps} paired steps" if self.steps > 1
                  else "1 paired step: no interval")
        return f"{self.value:.2f}x ({spread})"


def paired_ratio(a: dict, b: dict, warmup: int) -> Ratio | None:
    """a's time over b's, step by step: bench_train.py gives every run the same pairs in the same order, so step
    i's ratio cancels step i's length. The geometric mean of the ratios, with a 95% interval from their spread
    (Student's t on the logs). The interval holds the step-to-step noise; a difference that stays constant over
    one process's steps (its clocks, a kernel choice) is not in it: only a second round would show that."""
    logs = [math.log(x / y) for ra, rb in zip(a["step_seconds"], b["step_seconds"], strict=False)
            for x, y in zip(ra[warmup:], rb[warmup:], strict=False)]
    if not logs:
        return None
    mean = statistics.fmean(logs)
    if len(logs) == 1:
        return Ratio(math.exp(mean), 0.0, math.inf, 1)
    half = T975[min(len(logs) - 1, len(T975)) - 1] * statistics.stdev(logs) / math.sqrt(len(logs))
    return Ratio(math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs))


def defaults(c: Check) -> list[str]:
    """The GPU defaults that are guesses today, each with the measurement that decides it."""
    mem = "peak_gpu_gib" if not c.dry else "peak_rss_gib"
    return [flex_default(c, mem), budget_default(c, mem)]


def flex_default(c: Check, mem: str) -> str:
    parity = parity_cases(c.parts["tests"].details) if "tests" in c.parts else {}
    flex_parity = {k: case for k, case in parity.items() if "flex" in k}
    compare = []
    for name in ("bench-1b", "bench-8b"):
        sdpa, flex = measured(c, name, "orpo-packed"), measured(c, name, "orpo-flex")
        ratio = paired_ratio(flex, sdpa, c.plan.warmup) if sdpa and flex else None
        if ratio:
            compare.append((name, ratio, flex[mem] / sdpa[mem]))
    text = ("packed layout's attention kernel on CUDA: today sdpa with a dense boolean mask; flex_attention "
            "(block mask, skips masked blocks) is opt-in (model.attn_implementation). Decided by orpo-flex against "
            "orpo-packed in bench-1b and bench-8b (s/step, peak memory) and the flex parity test. Measured: ")
    if not compare:
        return text + "nothing yet (no flex run finished)."
    text += "; ".join(f"{n}: flex {r.text()} the time, {m:.2f}x the memory" for n, r, m in compare)
    return text + ". Verdict: " + flex_verdict(compare, flex_parity)


def flex_verdict(compare: list[tuple[str, Ratio, float]], flex_parity: dict[str, dict]) -> str:
    """flex_attention becomes the default when its parity test passed and every comparison puts its time at most
    0.95x sdpa's beyond the noise (the interval's top) at no more than 1.05x the memory. sdpa stays when the parity
    test did not pass, or a comparison puts flex above 0.95x beyond the noise (the interval's bottom) or above
    1.05x the memory. Anything else is undecided: the interval holds 0.95x."""
    outcomes = {case["outcome"] for case in flex_parity.values()}
    if outcomes != {"passed"}:
        why = "failed" if "failed" in outcomes else "was skipped" if "skipped" in outcomes else "did not run"
        return f"keep sdpa (flex parity {why})."
    if any(r.low > 0.95 or m > 1.05 for _, r, m in compare):
        return "keep sdpa."
    if all(r.high <= 0.95 for _, r, _ in compare):
        return "make flex_attention the CUDA default."
    return ("undecided: flex's time is within the noise of 0.95x sdpa's (the 95% interval holds it); more timed "
            "steps would decide.")


def budget_default(c: Check, mem: str) -> str:
    base = measured(c, "bench-1b", "orpo-packed")
    runs = {}
    for system in (c.parts["budget"].details if "budget" in c.parts else {}):
        r = measured(c, "budget", system)
        if r:
            runs[int(system.split("@")[1])] = r
    ratios = {b: paired_ratio(r, base, c.plan.warmup) for b, r in runs.items()} if base else {}
    ratios = {b: x for b, x in ratios.items() if x}
    text = (f"max_tokens_per_batch on a GPU: today 2 x batch x max_length; here {c.plan.budget_rule} = "
            f"{c.plan.default_budget}. Decided by the budget part against bench-1b's orpo-packed (s/step, peak memory). Measured: ")
    if not ratios:
        return text + "nothing yet (needs bench-1b's orpo-packed and the budget part)."
    text += "; ".join(f"{b}: {r['s_per_step']:.2f} s/step, {r[mem]:.1f} GiB"
                      for b, r in sorted({c.plan.default_budget: base, **runs}.items()))
    text += "; time against the default's: " + "; ".join(f"{b} {x.text()}" for b, x in sorted(ratios.items()))
    return text + ". Verdict: " + budget_verdict(ratios)


def budget_verdict(ratios: dict[int, Ratio]) -> str:
    """Another budget replaces the default when the default takes over 1.05x its time beyond the noise (the ratio's
    interval wholly under 1/1.05); the default stays when no budget can be that much faster (every interval's
    bottom at or above 1/1.05). Anything else is undecided: an interval holds 1/1.05."""
    faster = {b: x for b, x in ratios.items() if x.high < 1 / 1.05}
    if faster:
        best = min(faster, key=lambda b: faster[b].value)
        return f"make {best} (or its share of max_length) the default."
    if all(x.low >= 1 / 1.05 for x in ratios.values()):
        return "keep the default."
    return ("undecided: a budget's time is within the noise of 0.95x (1/1.05) the default's (the 95% interval "
            "holds it); more timed steps would decide.")
