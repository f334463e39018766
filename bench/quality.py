"""Does training help on real data, with settings chosen by `orpo sweep`? SmolLM2-135M-Instruct + LoRA on the two
shared preference sets.

    .venv/bin/python bench/quality.py [--sets orca,hh] [--time 60m] [--trials 12] [--objective accuracy]

Each set is shuffled once (seed 0): its first rows are the test split (the same 84 orca and 200 hh pairs as the
hand-picked study, bench/results/quality-handpicked.md), the next ones the pool `orpo sweep` takes its validation
split from and trains on. The sweep (TPE over SPACES, trials pruned at their evaluations, at most --time of search
per set) chooses on validation only; it then measures its best trial and the base model once on the test split.
Reported per set: every trial, the chosen settings, the plain and the length-balanced preference accuracy on test
before and after with their standard errors, and the wall time of the search and of the chosen trial's training.

The machine must be otherwise idle: wall times are part of the result. Needs ../shared/data (tests and the package
never do); writes OUT (markdown) and OUT's .json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SETS = {  # name: (file, pairs for test, validation, train at most): the hand-picked study's sizes
    "orca": ("orca-dpo-pairs-validation.jsonl", 84, 40, 160),
    "hh": ("hh-rlhf-harmless-base-test.jsonl.gz", 200, 100, 600),
}
COMMON = {"lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.05, "per_device_train_batch_size": 8,
          "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 1, "warmup_ratio": 0.1,
          "lr_scheduler_type": "linear", "optim": "adamw_torch", "gradient_checkpointing": False,
          "eval_on_start": False, "eval_steps": 0.25, "save_steps": None, "logging_steps": 2, "seed": 0}
LENGTHS = {"orca": {"max_length": 512, "max_prompt_length": 256}, "hh": {"max_length": 256, "max_prompt_length": 160}}
# Wider than the four hand-picked settings (lr 3e-4 / 1e-3, beta 0.1 / 0.5, 1-2 epochs): lr over a decade and a
# half, beta over a factor of 20; on orca one or two epochs (160 pairs: 7 or 14 min a trial), on hh one (600 pairs:
# 9 min a trial, two would leave room for three trials).
SPACES = {
    "orca": {"learning_rate": "log(2e-4,3e-3)", "beta": [0.05, 0.1, 0.25, 0.5, 1.0], "num_train_epochs": [1, 2]},
    "hh": {"learning_rate": "log(2e-4,3e-3)", "beta": [0.05, 0.1, 0.25, 0.5, 1.0]},
}
FIXED = {"orca": {}, "hh": {"num_train_epochs": 1}}
HANDPICKED = {  # bench/results/quality-handpicked.json: the chosen setting per set, on the same test pairs
    "orca": {"settings": "learning_rate=0.001 beta=0.5 num_train_epochs=2", "gain": "+50.0 pt ± 6.7", "after": "73.8% ± 4.8",
             "training": "13.8 min", "search": "3 settings, 41.0 min"},
    "hh": {"settings": "learning_rate=0.001 beta=0.5 num_train_epochs=1", "gain": "+7.0 pt ± 5.0", "after": "57.5% ± 3.5",
           "training": "9.1 min", "search": "1 setting (orca's choice), 9.1 min"},
}


def read_rows(name: str) -> list[dict]:
    path = SHARED / SETS[name][0]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def split(name: str, work: Path) -> dict[str, Path]:
    """test.jsonl (the hand-picked study's test pairs) and pool.jsonl (its validation and training pairs)."""
    rows = read_rows(name)
    random.Random(0).shuffle(rows)
    n_test, n_val, n_train = SETS[name][1:]
    parts = {"test": rows[:n_test], "pool": rows[n_test:n_test + n_val + n_train]}
    out = {}
    for part, chunk in parts.items():
        out[part] = work / name / f"{part}.jsonl"
        out[part].parent.mkdir(parents=True, exist_ok=True)
        out[part].write_text("".join(json.dumps(r) + "\n" for r in chunk))
    return out


def run_set(name: str, work: Path, trials: int, budget: str, objective: str) -> dict:
    import orpo

    files = split(name, work)
    config = {**COMMON, **LENGTHS[name], **FIXED[name], "data.path": str(files["pool"]), "data.eval_path": str(files["test"])}
    started = time.perf_counter()
    result = orpo.sweep(config, SPACES[name], trials=trials, time=budget, objective=objective, validation_size=SETS[name][2],
                        out=work / name / "sweep")
    search = time.perf_counter() - started  # the whole sweep: its trials and the one test measurement
    return {"set": name, "space": SPACES[name], "objective": objective, "trials": result.trials, "best": result.best,
            "test": result.test, "search_wall_s": round(search, 1), "table": result.table}


def pct(m: dict, key: str) -> str:
    from orpo.training.heldout import format_metric

    return format_metric(m.get(key), True, m.get(f"{key}_se"))


def markdown(results: list[dict], command: str) -> str:
    from orpo.training.heldout import change_cell

    out = ["# Does training help? SmolLM2-135M-Instruct + LoRA on real preference data, settings chosen by `orpo sweep`", "",
           f"`{command}`, {time.strftime('%Y-%m-%d')}, 2-core CPU, nothing else running. Search spaces "
           + "; ".join(f"{n} `{json.dumps(SPACES[n])}`" for n in SPACES) + " (TPE, median pruning at each quarter of a trial), objective: validation "
           f"{results[0]['objective'] if results else ''}. Preference accuracy: share of pairs whose chosen response has "
           "the higher mean per-token log-prob; length-balanced: the mean of that share on pairs whose chosen response "
           "is the longer (in tokens) and on those where it is the shorter; ± one binomial standard error (a change: the "
           "two combined). The test pairs took part in no choice; they are the hand-picked study's test pairs "
           "([quality-handpicked.md](quality-handpicked.md)).", "",
           "## Chosen settings and the test split", "",
           "| set | chosen (validation) | search | chosen trial's training | test: accuracy before -> after | change | "
           "length-balanced before -> after | change | hand-picked (same test pairs) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        best, test = r["best"], r["test"] or {}
        if not best or "after" not in test:
            out.append(f"| {r['set']} | no finished trial | {r['search_wall_s'] / 60:.1f} min | | | | | | |")
            continue
        b, a, h = test["before"], test["after"], HANDPICKED[r["set"]]
        shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["settings"].items())
        out.append(f"| {r['set']} | {shown} | {len(r['trials'])} trials, {r['search_wall_s'] / 60:.1f} min | {best['wall_s'] / 60:.1f} min "
                   f"| {pct(b, 'rewards/accuracies')} -> {pct(a, 'rewards/accuracies')} | {change_cell(b, a, 'rewards/accuracies', True)} "
                   f"| {pct(b, 'length_balanced_accuracy')} -> {pct(a, 'length_balanced_accuracy')} | "
                   f"{change_cell(b, a, 'length_balanced_accuracy', True)} | {h['settings']}: {h['gain']} ({h['search']}) |")
    for r in results:
        test = r["test"] or {}
        out += ["", f"## {r['set']}", ""]
        if "after" in test:
            b, a = test["before"], test["after"]
            out.append(f"Test split: {a['pairs']} pairs; chosen the longer in {a['accuracy_chosen_longer_n']}, the shorter in "
                       f"{a['accuracy_chosen_shorter_n']}, as long in {a['pairs_same_length']}. Accuracy on pairs whose chosen is "
                       f"the longer {pct(b, 'accuracy_chosen_longer')} -> {pct(a, 'accuracy_chosen_longer')}, the shorter "
                       f"{pct(b, 'accuracy_chosen_shorter')} -> {pct(a, 'accuracy_chosen_shorter')}. NLL of chosen "
                       f"{b['nll_loss']:.3f} -> {a['nll_loss']:.3f}; mean log-prob per token of chosen {b['logps/chosen']:.3f} -> "
                       f"{a['logps/chosen']:.3f}, of rejected {b['logps/rejected']:.3f} -> {a['logps/rejected']:.3f}.")
            out.append("")
        out.append(r["table"].split("\n", 2)[2].strip())  # the sweep's own table (without its title)
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="orca,hh")
    parser.add_argument("--trials", type=int, default=12, help="finished trials per set at most")
    parser.add_argument("--time", default="60m", help="search time per set (no trial starts after it)")
    parser.add_argument("--objective", default="accuracy", choices=["accuracy", "balanced_accuracy", "loss"])
    parser.add_argument("--work", default="/tmp/orpo-quality")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.md"))
    parser.add_argument("--keep", action="store_true", help="resume the sweeps in --work instead of starting again (the search goes on to --trials)")
    parser.add_argument("--merge", action="store_true", help="keep the other sets' results already in OUT's .json")
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED}: the shared data folder is missing (this study needs it; the package does not)")
    work, out = Path(args.work), Path(args.out)
    results, commands = [], []
    if args.merge and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        results = [r for r in old["results"] if r["set"] not in args.sets.split(",")]
        commands = old["commands"]
    for name in args.sets.split(","):
        if not args.keep:
            shutil.rmtree(work / name, ignore_errors=True)
        results.append(run_set(name, work, args.trials, args.time, args.objective))
        print(results[-1]["table"], flush=True)
    commands.append(f"python bench/quality.py --sets {args.sets} --trials {args.trials} --time {args.time} --objective {args.objective}"
                    + (" --keep" if args.keep else "") + (" --merge" if args.merge else ""))
    results.sort(key=lambda r: list(SETS).index(r["set"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, " && ".join(commands)))
    out.with_suffix(".json").write_text(json.dumps({"commands": commands, "results": results}, indent=2))
    print(out.read_text())


if __name__ == "__main__":
    main()
