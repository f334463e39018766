"""The GPU check: one command that answers every open GPU question on an offline CUDA machine.

    bench/gpu/run OUTDIR [--dry-run] [--parts P,Q] [--budget SECONDS] [--cap PART=SECONDS ...]

Parts, in this order, each under its own time cap (seconds, sized for an H100/H200; estimates until a run
measures them) and all of them under --budget (default 450 s: 7.5 minutes, leaving the wheels' install inside 8):
  tests     (90)   pytest -m gpu: packed-vs-plain parity in bf16 through sdpa's boolean mask, flex_attention's
                   block mask and a 4-bit base (tests/test_logps.py), then each engine on the GPU
                   (tests/test_distributed.py)
  bench-1b  (70)   Llama-3.2-1B-shaped LoRA: orpo packed (sdpa), packed (flex), plain, TRL 1.16, TRL + Liger
  bench-8b  (170)  Llama-3-8B-shaped QLoRA (NF4, bf16, gradient checkpointing, paged 8-bit AdamW): orpo packed
                   (sdpa), TRL, packed (flex), plain; s/step, pairs/s, peak GPU memory, MFU (bench/bench_train.py)
  recipe    (150)  recipes/llama3-8b-orpo-qlora.yaml through `orpo train` on the 8B-shaped model for 3 steps,
                   then `orpo merge --dtype bf16` and its logit check: the commands a user runs
  budget    (40)   max_tokens_per_batch on the 1B job: half and twice the GPU default (2 x batch x max_length)
A part that runs past its cap is stopped (its finished runs kept) and the next one starts; a part with too
little time left is SKIPPED. Results are written to OUTDIR as they come: results.json, results.md, check.log and
one log per part (8 files: what the device tool brings back). The summary names the GPU defaults that are
guesses today, what this run measured for each and a verdict, decided only when the 95% interval of the paired
step-time ratio (parts.paired_ratio) is clear of the verdict's threshold, "undecided" when it holds it. The tests
part PASSes only when every parity test passed (one skipped on the GPU FAILs it). Exit status 1 when a part FAILed.

--dry-run: the same code on this CPU with tiny shapes (no CUDA): argument handling, result files, caps, both
sides of the benchmark, the CLI; what needs CUDA (flex_attention's backward, Liger, the engines) is SKIPPED.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from parts import (
    DRY,
    GPU,
    OutOfTime,
    Part,
    Plan,
    defaults,
    part_bench,
    part_budget,
    part_recipe,
    part_tests,
    python,
)

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("tests", "bench-1b", "bench-8b", "recipe", "budget")
CAPS = {"tests": 90, "bench-1b": 70, "bench-8b": 170, "recipe": 150, "budget": 40}
BUDGET = 450
LEAST = 5  # seconds: a part with less time left is skipped


class Check:
    """Runs the parts in order under their caps and writes the results as they come."""

    def __init__(self, out: Path, work: Path, plan: Plan, dry: bool, caps: dict[str, int], budget: int):
        self.out, self.work, self.plan, self.dry, self.caps = out, work, plan, dry, caps
        self.end = time.monotonic() + budget  # restarted once the environment is read (start)
        self.budget = budget
        self.parts: dict[str, Part] = {}
        self.env: dict = {}
        self.deadline = 0.0
        self.log_file = out / "check.log"

    def say(self, text: str) -> None:
        print(text, flush=True)
        with self.log_file.open("a") as f:
            f.write(text + "\n")

    def run(self, cmd: list[str], log: Path, env: dict | None = None) -> int:
        """`cmd` with its output appended to `log`; killed with its children at the part's deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OutOfTime
        with log.open("a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
            try:
                return proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise OutOfTime from None

    def part(self, name: str, body) -> None:
        cap = self.caps[name]
        part = self.parts[name] = Part(name, cap)
        left = self.end - time.monotonic()
        if left < LEAST:
            part.reason = f"{left:.0f} s left of the {self.budget} s budget"
            self.say(part.line())
            return self.write()
        limit = min(cap, int(left))
        started = time.monotonic()
        self.deadline = started + limit
        self.say(f"--- {name} (cap {limit} s)")
        try:
            body(part)
        except OutOfTime:
            part.status, part.reason = "FAIL", f"stopped at its {limit} s cap"
        except Exception as exc:  # a broken part is reported, and the next one runs
            part.status, part.reason = "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}"
        part.seconds = time.monotonic() - started
        self.say(part.line())
        self.write()

    def write(self) -> None:
        """results.json and results.md from what has run so far (atomic: a reader never sees half a file)."""
        record = {"dry_run": self.dry, "budget_seconds": self.budget, "env": self.env, "plan": asdict(self.plan),
                  "parts": {n: asdict(p) for n, p in self.parts.items()}, "defaults": defaults(self)}
        for name, text in (("results.json", json.dumps(record, indent=2) + "\n"), ("results.md", markdown(self, record))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)


def environment() -> dict:
    """Versions and the device, read in a child process (this one stays off the GPU)."""
    code = ("import json, importlib.metadata as md, platform, torch\n"
            "v = {}\n"
            "for n in ('torch','transformers','peft','accelerate','trl','bitsandbytes','datasets','pydantic','gguf',"
            "'liger-kernel','triton','orpo'):\n"
            "    try: v[n] = md.version(n)\n"
            "    except md.PackageNotFoundError: v[n] = None\n"
            "cuda = torch.cuda.is_available()\n"
            "print(json.dumps({'python': platform.python_version(), 'versions': v, 'cuda': cuda,\n"
            "  'gpu': torch.cuda.get_device_name() if cuda else None, 'cuda_version': torch.version.cuda,\n"
            "  'capability': list(torch.cuda.get_device_capability()) if cuda else None,\n"
            "  'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}))\n")
    done = subprocess.run([python(), "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"cannot read the environment:\n{done.stderr[-2000:]}")
    env = json.loads(done.stdout.strip().splitlines()[-1])
    env["wheels_install_seconds"] = os.environ.get("ORPO_GPU_INSTALL_SECONDS")
    env["peak_bf16_tflops"], env["mfu"] = mfu_basis(env["gpu"])
    return env


def mfu_basis(gpu: str | None) -> tuple[float | None, str]:
    """The dense bf16 peak bench_train.py divides by for this card (its PEAK_BF16_TFLOPS), and that in words."""
    if not gpu:
        return None, "no GPU: MFU not computed"
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "bench_train.py")
    bench_train = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (its dataclasses look it up)
    spec.loader.exec_module(bench_train)  # its imports at the top are the standard library's
    peak = bench_train.peak_tflops(gpu)
    return peak, (f"MFU against {gpu}'s {peak:g} TFLOP/s dense bf16" if peak else f"unknown card {gpu}: MFU not computed")



def markdown(c: Check, record: dict) -> str:
    env = record["env"]
    head = (f"# GPU check{' (dry run on the CPU)' if c.dry else ''}\n\n{env.get('gpu') or 'no GPU'}; Python {env.get('python')}, "
            + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v) + f"; {env.get('mfu', '')}\n\n"
            "| part | status | figure | seconds (cap) |\n|---|---|---|---|\n")
    rows = "".join(f"| {p.name} | {p.status}{f' ({p.reason})' if p.reason else ''} | {p.figure} | {p.seconds:.0f} ({p.cap}) |\n"
                   for p in c.parts.values())
    tables = "".join(f"\n## {p.name}\n\n{p.table}\n" for p in c.parts.values() if p.table)
    guesses = "".join(f"- {line}\n" for line in record["defaults"])
    return head + rows + tables + "\n## GPU defaults that are guesses today\n\n" + guesses


# ---------------------------------------------------------------- command line


def caps(items: list[str]) -> dict[str, int]:
    out = dict(CAPS)
    for item in items:
        name, _, value = item.partition("=")
        if name not in CAPS or not value.isdigit():
            raise SystemExit(f"--cap {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        out[name] = int(value)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for results.json, results.md and the logs (made if missing)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: every part's code, no CUDA")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    ap.add_argument("--budget", type=int, default=BUDGET, help="seconds for all parts together")
    ap.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="one part's time cap")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "orpo-gpu-check",
                    help="scratch folder: models, runs, caches (the 8B-shaped model takes 16 GB)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    names = [n for n in a.parts.split(",") if n]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"unknown parts {unknown}: choose from {', '.join(PARTS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    for old in a.out.glob("log-*.txt"):
        old.unlink()
    (a.out / "check.log").unlink(missing_ok=True)
    c = Check(a.out, a.work, DRY if a.dry_run else GPU, a.dry_run, caps(a.cap), a.budget)
    c.env = environment()
    c.end = time.monotonic() + a.budget
    if not c.env["cuda"] and not a.dry_run:
        print("no CUDA device here: bench/gpu/run needs one (or --dry-run for tiny shapes on the CPU)", file=sys.stderr)
        return 2
    c.say(f"GPU check{' (dry run)' if a.dry_run else ''}: {c.env['gpu'] or 'CPU'}, torch {c.env['versions']['torch']}, "
          f"transformers {c.env['versions']['transformers']}; parts {', '.join(names)} in {a.budget} s; {c.env['mfu']}")
    bodies = {
        "tests": lambda p: part_tests(c, p),
        "bench-1b": lambda p: part_bench(c, p, "bench-1b", c.plan.scenario_1b, c.plan.systems_1b),
        "bench-8b": lambda p: part_bench(c, p, "bench-8b", c.plan.scenario_8b, c.plan.systems_8b),
        "recipe": lambda p: part_recipe(c, p),
        "budget": lambda p: part_budget(c, p),
    }
    for name in PARTS:
        if name in names:
            c.part(name, bodies[name])
    c.say("\n== summary")
    for p in c.parts.values():
        c.say(p.line())
    for line in defaults(c):
        c.say(f"default: {line}")
    c.write()
    return 1 if any(p.status == "FAIL" for p in c.parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
