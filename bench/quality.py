"""Does training help on real data? SmolLM2-135M-Instruct with LoRA on the two shared preference sets.

    .venv/bin/python bench/quality.py [--sets orca,hh] [--trl] [--out bench/results/quality.md]

Each set is shuffled once (seed 0) and split into train / validation / test files. Every candidate setting
(CANDIDATES) trains on train and is judged on validation only (held-out preference accuracy before and after);
the one with the largest validation gain within the time budget is then measured on test, with the base model
on the same test pairs, so the test pairs never take part in a choice. With --trl the chosen setting is also
trained by TRL 1.16's ORPOTrainer on the same tokenized pairs (same lr, beta, LoRA, batch, schedule, steps) and
measured on the same test pairs by the same code; the curves of both go into one figure.

Preference accuracy is the share of pairs whose chosen response has the higher mean per-token log-prob, with its
binomial standard error. The machine must be otherwise idle: wall times are part of the result. Needs
../shared/data (tests and the package never do); writes OUT (markdown), OUT's .json and a .png beside it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SETS = {  # name: (file, pairs for test, validation, train at most)
    "orca": ("orca-dpo-pairs-validation.jsonl", 84, 40, 160),
    "hh": ("hh-rlhf-harmless-base-test.jsonl.gz", 200, 100, 600),
}
BUDGET_S = 15 * 60  # training wall time a setting may take (2 cores)


@dataclass
class Setting:
    name: str
    overrides: dict  # on top of COMMON
    sets: tuple[str, ...] = ("orca", "hh")


COMMON = {"lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.05, "per_device_train_batch_size": 8,
          "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 1, "warmup_ratio": 0.1,
          "lr_scheduler_type": "linear", "optim": "adamw_torch", "gradient_checkpointing": False,
          "eval_on_start": True, "eval_steps": 0.5, "save_steps": None, "logging_steps": 2, "seed": 0}
CANDIDATES = [  # orca: 160 long pairs, 2 epochs fit the budget; hh: 600 short pairs, one epoch does
    Setting("lr1e-3-2ep", {"learning_rate": 1e-3, "num_train_epochs": 2, "beta": 0.1}, sets=("orca",)),
    Setting("lr3e-4-2ep", {"learning_rate": 3e-4, "num_train_epochs": 2, "beta": 0.1}, sets=("orca",)),
    Setting("lr1e-3-2ep-beta0.5", {"learning_rate": 1e-3, "num_train_epochs": 2, "beta": 0.5}, sets=("orca",)),
    # hh: one setting fits the session that ran it: orca's best (its validation choice), one epoch
    Setting("lr1e-3-1ep-beta0.5", {"learning_rate": 1e-3, "num_train_epochs": 1, "beta": 0.5}, sets=("hh",)),
]
LENGTHS = {"orca": {"max_length": 512, "max_prompt_length": 256}, "hh": {"max_length": 256, "max_prompt_length": 160}}


@dataclass
class Result:
    set: str
    setting: str
    overrides: dict
    wall_s: float
    steps: int
    val_before: dict
    val_after: dict
    test_before: dict = field(default_factory=dict)
    test_after: dict = field(default_factory=dict)


def read_rows(name: str) -> list[dict]:
    path = SHARED / SETS[name][0]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def split(name: str, work: Path) -> dict[str, Path]:
    """train / val / test .jsonl files (shuffled once, seed 0)."""
    rows = read_rows(name)
    random.Random(0).shuffle(rows)
    n_test, n_val, n_train = SETS[name][1:]
    parts = {"test": rows[:n_test], "val": rows[n_test:n_test + n_val], "train": rows[n_test + n_val:][:n_train]}
    out = {}
    for part, chunk in parts.items():
        out[part] = work / name / f"{part}.jsonl"
        out[part].parent.mkdir(parents=True, exist_ok=True)
        out[part].write_text("".join(json.dumps(r) + "\n" for r in chunk))
    return out


def items(d: dict) -> list[str]:
    return [f"{k}={'null' if v is None else v}" for k, v in d.items()]


def config_for(files: dict[str, Path], name: str, setting: Setting, out: Path, eval_on: str = "val"):
    from orpo.config import load_config

    overrides = {**COMMON, **LENGTHS[name], **setting.overrides, "data.path": files["train"], "data.eval_path": files[eval_on],
                 "output_dir": out, "overwrite_output_dir": True}
    return load_config(None, items(overrides))


def held_out(spec: str, files: dict[str, Path], name: str, setting: Setting) -> dict:
    """Preference metrics of a run or the base model on the test pairs (no generation)."""
    from orpo.after.eval import evaluate_target
    from orpo.after.runs import resolve

    overrides = items({**LENGTHS[name], "data.path": files["train"], "data.eval_path": files["test"],
                       "per_device_eval_batch_size": 8, "beta": setting.overrides.get("beta", 0.1)})
    if spec == "builtin":
        overrides.append("lora.enabled=false")
    metrics = evaluate_target(resolve(spec, overrides), samples=0, generate=False)
    return {k: v for k, v in metrics.items() if k != "samples"}


def run_setting(files, name: str, setting: Setting, work: Path, reuse: bool = False) -> Result:
    """Train (or, with `reuse`, read a finished run of the same setting back) and report validation metrics."""
    from orpo.training.loop import train

    out = work / name / setting.name
    if reuse and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        wall = summary["wall_seconds"]
    else:
        started = time.perf_counter()
        summary = train(config_for(files, name, setting, out))
        wall = time.perf_counter() - started
    print(f"{name} {setting.name}: {summary['steps']} steps in {wall:.0f} s, validation accuracy "
          f"{summary['before']['rewards/accuracies']:.3f} -> {summary['after']['rewards/accuracies']:.3f}", flush=True)
    return Result(name, setting.name, setting.overrides, round(wall, 1), summary["steps"], summary["before"], summary["after"])


def gain(r: Result, side: str = "val") -> float:
    before, after = getattr(r, f"{side}_before"), getattr(r, f"{side}_after")
    return after["rewards/accuracies"] - before["rewards/accuracies"]


# ---------------------------------------------------------------- TRL on the same pairs


def trl_run(files, name: str, setting: Setting, work: Path) -> dict:
    """TRL's ORPOTrainer on orpo's tokenized training pairs with the setting's hyperparameters; its log history,
    wall time and the test metrics measured by orpo's own held-out code."""
    import datasets
    import torch
    from accelerate import Accelerator
    from bench_train import trl_row  # bench/ is on sys.path when this runs as a script
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from orpo.data.pairs import load_pairs
    from orpo.model.builtin import builtin_model_dir
    from orpo.model.load import load_tokenizer
    from orpo.training.heldout import evaluate_all

    config = config_for(files, name, setting, work / name / "trl-orpo-config", eval_on="test")
    tokenizer, _ = load_tokenizer(config)
    train_ds, test_ds, test_raw, _ = load_pairs(config, tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = ORPOConfig(
        output_dir=str(work / name / "trl"), beta=config.beta, learning_rate=config.learning_rate, lr_scheduler_type="linear",
        warmup_steps=config.warmup_steps or config.warmup_ratio, max_grad_norm=config.max_grad_norm, per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, num_train_epochs=config.num_train_epochs,
        max_length=config.max_length, disable_dropout=False, use_cpu=True, logging_steps=config.logging_steps, save_strategy="no",
        report_to=[], seed=0, dataloader_num_workers=0, remove_unused_columns=False, optim="adamw_torch",
    )
    stub = datasets.Dataset.from_list([{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}])
    trainer = ORPOTrainer(model=model, args=args, train_dataset=stub, processing_class=tokenizer)

    trainer.train_dataset = datasets.Dataset.from_list([trl_row(p) for p in train_ds])
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    accelerator = Accelerator(cpu=True)
    metrics = evaluate_all(config, trainer.model, tokenizer, test_ds, test_raw, accelerator, "trl", generate=False)
    return {"wall_s": round(wall, 1), "steps": trainer.state.global_step, "test_after": {k: v for k, v in metrics.items() if k != "samples"},
            "history": [h for h in trainer.state.log_history if "loss" in h]}


def figure(orpo_run: Path, trl: dict, path: Path) -> None:
    """loss, preference accuracy and margin per step: orpo (metrics.jsonl) and TRL (log history) together."""
    from matplotlib.figure import Figure

    from orpo.after.report import read_metrics, series

    lines = read_metrics(orpo_run)
    fig = Figure(figsize=(13, 3.6), dpi=100)
    for i, (key, title) in enumerate([("loss", "loss"), ("rewards/accuracies", "preference accuracy (training batches)"),
                                      ("rewards/margins", "reward margin")]):
        ax = fig.add_subplot(1, 3, i + 1)
        steps, values = series(lines, key)
        ax.plot(steps, values, label="orpo", color="C0")
        points = [(h["step"], h[key]) for h in trl["history"] if key in h]
        ax.plot([s for s, _ in points], [v for _, v in points], label="TRL ORPOTrainer", color="C1", linestyle="--")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------- report


def pct(m: dict, key: str = "rewards/accuracies") -> str:
    return f"{100 * m[key]:.1f}% ± {100 * m[f'{key}_se']:.1f}" if m else "-"


def reading(r: Result) -> str:
    """What the test figures say, in words: the gain against the 10-point target and its standard error, and
    what moved besides (the NLL term's work on chosen, the log-probs of chosen and rejected)."""
    import math

    b, a = r.test_before, r.test_after
    change = a["rewards/accuracies"] - b["rewards/accuracies"]
    se = math.hypot(b["rewards/accuracies_se"], a["rewards/accuracies_se"])
    verdict = ("reaches the 10-point target" if change >= 0.10 else "misses the 10-point target")
    words = (f"held-out preference accuracy {100 * change:+.1f} points ({change / se:.1f} standard errors) in "
             f"{r.wall_s / 60:.1f} min of training: {verdict}. ")
    words += (f"NLL of chosen {b['nll_loss']:.3f} -> {a['nll_loss']:.3f}; mean log-prob per token of chosen "
              f"{b['logps/chosen']:.3f} -> {a['logps/chosen']:.3f}, of rejected {b['logps/rejected']:.3f} -> "
              f"{a['logps/rejected']:.3f}; reward margin {b['rewards/margins']:+.4f} -> {a['rewards/margins']:+.4f}.")
    return words


def markdown(results: list[Result], chosen: dict[str, Result], trl: dict[str, dict], command: str) -> str:
    from orpo.training.heldout import change_cell

    out = ["# Does training help? SmolLM2-135M-Instruct + LoRA on real preference data", "",
           f"`{command}`, {time.strftime('%Y-%m-%d')}, 2-core CPU, nothing else running. Preference accuracy: share of "
           "held-out pairs whose chosen response has the higher mean per-token log-prob, ± one binomial standard error "
           "(a change: the two combined). Settings were chosen on the validation split only; test pairs were used once, "
           "for the chosen setting and the base model.", "",
           "## Every setting, on the validation split", "",
           "| set | setting | steps | training wall | validation accuracy before -> after | change |", "|---|---|---|---|---|---|"]
    for r in results:
        out.append(f"| {r.set} | {r.setting} `{' '.join(items(r.overrides))}` | {r.steps} | {r.wall_s / 60:.1f} min | "
                   f"{pct(r.val_before)} -> {pct(r.val_after)} | {change_cell(r.val_before, r.val_after, 'rewards/accuracies', True)} |")
    out += ["", "## The chosen setting per set, on the test split", "",
            "| set | setting | test pairs | base (before) | after | change | NLL before -> after |", "|---|---|---|---|---|---|---|"]
    for name, r in chosen.items():
        out.append(f"| {name} | {r.setting} | {r.test_after.get('pairs', '?')} | {pct(r.test_before)} | {pct(r.test_after)} | "
                   f"{change_cell(r.test_before, r.test_after, 'rewards/accuracies', True)} | "
                   f"{r.test_before['nll_loss']:.3f} -> {r.test_after['nll_loss']:.3f} |")
    out += ["", "## Reading", ""]
    for name, r in chosen.items():
        out.append(f"- **{name}**: " + reading(r))
    if trl:
        out += ["", "## The same setting through TRL 1.16's ORPOTrainer (same tokenized pairs, same test code)", "",
                "| set | trainer | steps | training wall | test accuracy after |", "|---|---|---|---|---|"]
        for name, t in trl.items():
            r = chosen[name]
            out.append(f"| {name} | orpo | {r.steps} | {r.wall_s / 60:.1f} min (with its evaluations) | {pct(r.test_after)} |")
            out.append(f"| {name} | TRL | {t['steps']} | {t['wall_s'] / 60:.1f} min (no evaluations) | {pct(t['test_after'])} |")
            out.append("")
            out.append(f"![orpo and TRL curves, {name}](quality-{name}-trl.png)")
    return "\n".join(out) + "\n"


def load_previous(path: Path, redo: list[str]) -> tuple[list[Result], dict[str, Result], dict[str, dict], list[str]]:
    """The results of the sets not being run again, from an earlier run's .json (its chosen setting per set is
    the one measured on test)."""
    data = json.loads(path.read_text())
    results = [Result(**r) for r in data["results"] if r["set"] not in redo]
    chosen = {r.set: r for r in results if r.test_after}
    trl = {k: v for k, v in data.get("trl", {}).items() if k not in redo}
    commands = data.get("commands") or ["python bench/quality.py --sets " + ",".join(sorted(chosen)) + (" --trl" if trl else "")]
    return results, chosen, trl, commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="orca,hh")
    parser.add_argument("--settings", default=",".join(s.name for s in CANDIDATES))
    parser.add_argument("--trl", action="store_true", help="also train the chosen setting with TRL's ORPOTrainer")
    parser.add_argument("--work", default="/tmp/orpo-quality")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.md"))
    parser.add_argument("--merge", action="store_true", help="keep the other sets' results already in OUT's .json")
    parser.add_argument("--reuse", action="store_true", help="read finished runs in --work back instead of training again")
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED}: the shared data folder is missing (this study needs it; the package does not)")
    work, out = Path(args.work), Path(args.out)
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    results, chosen, trl, commands = [], {}, {}, []
    if args.merge and out.with_suffix(".json").is_file():
        results, chosen, trl, commands = load_previous(out.with_suffix(".json"), args.sets.split(","))
    wanted = args.settings.split(",")
    for name in args.sets.split(","):
        files = split(name, work)
        mine = [run_setting(files, name, s, work, args.reuse) for s in CANDIDATES if s.name in wanted and name in s.sets]
        results += mine
        fits = [r for r in mine if r.wall_s <= BUDGET_S] or mine
        best = max(fits, key=gain)
        setting = next(s for s in CANDIDATES if s.name == best.setting)
        best.test_before = held_out("builtin", files, name, setting)
        best.test_after = held_out(str(work / name / best.setting), files, name, setting)
        chosen[name] = best
        print(f"{name}: chose {best.setting}; test accuracy {pct(best.test_before)} -> {pct(best.test_after)}", flush=True)
        if args.trl:
            trl[name] = trl_run(files, name, setting, work)
            figure(work / name / best.setting, trl[name], out.with_name(f"quality-{name}-trl.png"))
            print(f"{name}: TRL test accuracy {pct(trl[name]['test_after'])} in {trl[name]['wall_s']:.0f} s", flush=True)
    command = "python bench/quality.py " + " ".join(f"--{k} {v}" for k, v in (("sets", args.sets), ("settings", args.settings)))
    command += (" --trl" if args.trl else "") + (" --merge" if args.merge else "")
    commands.append(command)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, chosen, trl, " && ".join(commands)))
    out.with_suffix(".json").write_text(json.dumps({"commands": commands, "results": [asdict(r) for r in results], "trl": trl}, indent=2))
    print(out.read_text())


if __name__ == "__main__":
    main()
