"""Does `orpo plan`'s memory model predict real peaks? Real `orpo train` runs on this CPU, each one's peak RSS
against the plan's prediction for the same config (the CPU target: no CUDA context, the process's runtime instead).

    .venv/bin/python bench/plan_check.py [--runs r1,r2] [--out bench/results/plan-cpu.md] [--runtime] [--split]

The runs span LoRA and full fine-tuning, gradient checkpointing on and off, batch 1-8, max_length 256-1024, the
packed and plain layouts, SmolLM2-135M-Instruct (the embedded model, vocabulary 49,152, tied output layer) and
a random-weight Llama-shaped model with Llama 3's 128,256-token vocabulary (hidden 512, 8 layers, untied output
layer: the logits dominate). Each trains 2 optimizer steps (the second holds the optimizer states) on generated
pairs of varied length, longer than max_length for some, with evaluation and checkpoints off. Peak RSS is the
process's own maximum resident set (getrusage of the child). --runtime measures what CPU_RUNTIME_GIB stands for:
the RSS of `orpo train` stopped just before the model loads. --split runs each config under bench/rss_split.py
instead and writes where the peak RSS is (glibc's heap, its free part, mapped tensors, the rest) beside the plan's
parts: bench/results/plan-cpu-split.md.

RSS does not depend on other load, but the runs take ~20 minutes; writes OUT and OUT's .json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = Path.home() / ".cache" / "orpo" / "plan-check"
VOCAB_MODEL = WORK / "llama-vocab128k"
WORDS = ("the of and to in is was for on that with as by at from his her an be this are or had not but what all "
         "were when we there can more one your if which their will up other about out many then them these so some "
         "would make like him into time has look two more write go see number no way could people my than first water "
         "been call who oil its now find long down day did get come made may part").split()
COMMON = {"max_steps": 2, "eval_steps": None, "eval_on_start": False, "save_steps": None, "data.test_size": 0,
          "logging_steps": 1, "learning_rate": 1e-4, "report_to": [], "overwrite_output_dir": True, "seed": 0,
          "data.format": "prompt_response", "data.cache": False}
SMOL = {"model.name_or_path": "builtin"}
BIG_VOCAB = {"model.name_or_path": str(VOCAB_MODEL)}
# name: (model, settings)
RUNS = {
    "r1": (SMOL, {"lora.enabled": True, "gradient_checkpointing": False, "per_device_train_batch_size": 8, "max_length": 512, "max_prompt_length": 256, "layout": "packed", "optim": "adamw_torch"}),
    "r2": (SMOL, {"lora.enabled": True, "gradient_checkpointing": True, "per_device_train_batch_size": 8, "max_length": 1024, "max_prompt_length": 512, "layout": "packed", "optim": "adamw_torch"}),
    "r3": (SMOL, {"lora.enabled": True, "gradient_checkpointing": False, "per_device_train_batch_size": 2, "max_length": 1024, "max_prompt_length": 512, "layout": "plain", "optim": "adamw_torch"}),
    "r4": (SMOL, {"lora.enabled": False, "gradient_checkpointing": False, "per_device_train_batch_size": 4, "max_length": 512, "max_prompt_length": 256, "layout": "packed", "optim": "adamw_torch_fused"}),
    "r5": (SMOL, {"lora.enabled": False, "gradient_checkpointing": True, "per_device_train_batch_size": 8, "max_length": 1024, "max_prompt_length": 512, "layout": "packed", "optim": "adamw_torch"}),
    "r6": (SMOL, {"lora.enabled": False, "gradient_checkpointing": False, "per_device_train_batch_size": 1, "max_length": 256, "max_prompt_length": 128, "layout": "plain", "optim": "adamw_torch"}),
    "r7": (SMOL, {"lora.enabled": True, "gradient_checkpointing": True, "per_device_train_batch_size": 4, "max_length": 512, "max_prompt_length": 256, "layout": "plain", "optim": "adamw_torch_fused"}),
    "r8": (BIG_VOCAB, {"lora.enabled": True, "gradient_checkpointing": False, "per_device_train_batch_size": 4, "max_length": 1024, "max_prompt_length": 512, "layout": "packed", "optim": "adamw_torch"}),
    "r9": (BIG_VOCAB, {"lora.enabled": False, "gradient_checkpointing": True, "per_device_train_batch_size": 2, "max_length": 512, "max_prompt_length": 256, "layout": "plain", "optim": "adamw_torch"}),
    "r10": (BIG_VOCAB, {"lora.enabled": True, "gradient_checkpointing": True, "per_device_train_batch_size": 8, "max_length": 256, "max_prompt_length": 128, "layout": "plain", "optim": "adamw_torch"}),
    # held out: not used to fit the CPU heap shares
    "r11": (SMOL, {"lora.enabled": True, "gradient_checkpointing": False, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_length": 512, "max_prompt_length": 256, "layout": "plain", "optim": "adamw_torch"}),
    "r12": (SMOL, {"lora.enabled": False, "gradient_checkpointing": True, "per_device_train_batch_size": 4, "max_length": 512, "max_prompt_length": 256, "layout": "packed", "optim": "adamw_torch"}),
    "r13": (BIG_VOCAB, {"lora.enabled": True, "gradient_checkpointing": False, "per_device_train_batch_size": 2, "max_length": 512, "max_prompt_length": 256, "layout": "packed", "optim": "adamw_torch"}),
}
HELD_OUT = ("r11", "r12", "r13")


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_pairs(path: Path, n: int = 64, seed: int = 0) -> Path:
    """Prompt/chosen/rejected rows of varied length (roughly one token a word): prompts 30-700 words, responses
    20-900, so that some pairs are cut at max_length and max_prompt_length and some are short."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            row = {"prompt": f"Question {i}: " + text(rng, rng.randint(30, 700)), "chosen": text(rng, rng.randint(20, 900)),
                   "rejected": text(rng, rng.randint(20, 900))}
            f.write(json.dumps(row) + "\n")
    return path


def vocab_model() -> Path:
    """A random Llama with Llama 3's vocabulary (128,256), SmolLM2's tokenizer (its ids fit), saved once."""
    if (VOCAB_MODEL / "config.json").is_file():
        return VOCAB_MODEL
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from orpo.model.builtin import builtin_model_dir

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=128_256, tie_word_embeddings=False, max_position_embeddings=4096)
    model = LlamaForCausalLM(config)
    model.save_pretrained(VOCAB_MODEL)
    AutoTokenizer.from_pretrained(builtin_model_dir()).save_pretrained(VOCAB_MODEL)
    return VOCAB_MODEL


def settings(name: str, data: Path) -> dict:
    model, own = RUNS[name]
    return {**COMMON, **model, **own, "data.path": str(data), "output_dir": str(WORK / "runs" / name)}


def written(name: str, data: Path) -> tuple[dict, Path]:
    """Run `name`'s flat settings, and its config file under WORK (written)."""
    flat = settings(name, data)
    config = WORK / f"{name}.yaml"
    config.write_text(yaml.safe_dump(unflatten(flat)))
    return flat, config


def measure(config_file: Path) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of `orpo train CONFIG` in a fresh process."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "orpo.cli", "train", str(config_file)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{config_file}: orpo train failed:\n{out.stderr[-3000:]}")
    kib = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK")))
    return kib / 2**20, time.monotonic() - started


def measure_split(config_file: Path) -> dict:
    """Peak RSS of `orpo train CONFIG` split by glibc's accounting (bench/rss_split.py), GiB."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rss_split.py"), "train", str(config_file)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{config_file}: orpo train failed:\n{out.stderr[-3000:]}")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RSS-SPLIT")).split(" ", 1)[1])


def split_table(rows: list[dict], out: Path) -> None:
    """Where each run's peak RSS is, against the plan's parts (what the tensors need, and the heap term)."""
    lines = ["# Where the CPU runs' peak RSS is (glibc's accounting at the peak)", "",
             "`.venv/bin/python bench/plan_check.py --split`: each run of plan-cpu.md under bench/rss_split.py. GiB. "
             "heap = the main heap's extent (tensors under malloc's mmap threshold, in use or freed and kept), "
             "free = its free part, mapped = tensors in their own mappings (given back when freed), other = Python, "
             "libraries and the weights read from their files; live max = the largest in-use total seen. "
             "plan live = the plan's tensors (weights excluded, no heap term); plan heap = its heap term; "
             "acts = one pass's layer activations (the largest pass), which the heap term is a share of.", "",
             "| run | settings | peak RSS | heap | free | mapped | other | live max | plan live | free / acts | plan heap |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, p = r["split"], r["parts_gib"]
        live = sum(p[k] for k in ("lora", "gradients", "optimizer", "activations", "output_layer", "transient"))
        acts = r["acts_gib"]
        lines.append(f"| {r['run']} | {r['settings']} | {m['rss']:.3f} | {m['heap']:.3f} | {m['heap_free']:.3f} | "
                     f"{m['mmapped']:.3f} | {m['other']:.3f} | {m['live_max']:.3f} | {live:.3f} | "
                     f"{m['heap_free'] / acts:.2f} | {p['heap']:.3f} |")
    lines.append("")
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


def predict(flat: dict) -> dict:
    from orpo.config import make_config
    from orpo.training.memory import GIB, layer_bytes
    from orpo.training.plan import lay_out, plan_job, read_arch, read_lengths, setup_for

    config = make_config(flat)
    plan = plan_job(config, gpus=["cpu"])
    target = plan.target("CPU")
    arch, (lengths, new_tokens) = read_arch(config), read_lengths(config)
    setup, _ = setup_for(config, arch, "cpu", None, new_tokens)
    steps = lay_out(config, lengths, "cpu", setup.kernel, 1)
    acts = max(arch.layers * layer_bytes(arch, setup, p) for passes in steps for p in passes) / GIB
    return {"predicted_gib": target.peak_gib, "parts_gib": target.as_dict()["parts_gib"], "lengths": plan.lengths_source,
            "acts_gib": round(acts, 3)}


def describe(flat: dict) -> str:
    accumulation = f" x{flat['gradient_accumulation_steps']} accumulated" if flat.get("gradient_accumulation_steps", 1) > 1 else ""
    model = "SmolLM2-135M" if flat["model.name_or_path"] == "builtin" else "Llama-shape 128k vocab"
    return (f"{model}, {'LoRA' if flat['lora.enabled'] else 'full'}, GC {'on' if flat['gradient_checkpointing'] else 'off'}, "
            f"batch {flat['per_device_train_batch_size']}{accumulation}, max_length {flat['max_length']}, {flat['layout']}, {flat['optim']}")


def runtime_only(data: Path) -> float:
    """RSS of `orpo train` stopped just before the model loads (the CPU runtime of the memory model)."""
    code = ("import resource, sys\nfrom orpo.training import loop\n"
            "def stop(*a, **k):\n    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(0)\n"
            "loop.build_model = stop\nfrom orpo.cli import main\nsys.argv = ['orpo', 'train', sys.argv[1]]\nmain()\n")
    config = WORK / "runtime.yaml"
    config.write_text(yaml.safe_dump(unflatten(settings("r1", data))))
    out = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True)
    return int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK"))) / 2**20


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan-cpu.md"))
    parser.add_argument("--runtime", action="store_true", help="measure the CPU runtime (RSS before the model loads) and stop")
    parser.add_argument("--split", action="store_true", help="measure where each run's peak RSS is (bench/rss_split.py) and write plan-cpu-split.md")
    parser.add_argument("--predict-only", action="store_true", help="keep OUT's measured peaks and predict them again (after a change to the model); runs OUT lacks are measured")
    args = parser.parse_args()
    data = write_pairs(WORK / "pairs.jsonl")
    if args.runtime:
        print(f"RSS before the model loads: {runtime_only(data):.3f} GiB")
        return
    vocab_model()
    if args.split:
        out = Path(args.out).with_name("plan-cpu-split.md")
        if args.predict_only:  # the stored measurements, predicted again
            rows = json.loads(out.with_suffix(".json").read_text())
            for row in rows:
                predicted = predict(settings(row["run"], data))
                row["parts_gib"], row["acts_gib"] = predicted["parts_gib"], predicted["acts_gib"]
            split_table(rows, out)
            return
        rows = []
        for name in args.runs.split(","):
            flat, config = written(name, data)
            predicted = predict(flat)
            rows.append({"run": name, "settings": describe(flat), "split": measure_split(config), "parts_gib": predicted["parts_gib"],
                         "acts_gib": predicted["acts_gib"]})
            print(f"{name}: {rows[-1]['split']}", flush=True)
        split_table(rows, out)
        return
    rows = []
    kept = {r["run"]: r for r in json.loads(Path(args.out).with_suffix(".json").read_text())} if args.predict_only else {}
    for name in args.runs.split(","):
        flat, config = written(name, data)
        predicted = predict(flat)
        if name in kept:
            measured, seconds = kept[name]["measured_gib"], kept[name]["seconds"]
        else:
            measured, seconds = measure(config)
        error = (predicted["predicted_gib"] - measured) / measured
        row = {"run": name, "settings": describe(flat), "measured_gib": round(measured, 3),
               "predicted_gib": round(predicted["predicted_gib"], 3), "error": round(error, 4), "seconds": round(seconds, 1),
               "parts_gib": predicted["parts_gib"], "lengths": predicted["lengths"]}
        rows.append(row)
        print(f"{name}: {row['settings']}: measured {measured:.3f} GiB, predicted {predicted['predicted_gib']:.3f} GiB "
              f"({100 * error:+.1f}%), {seconds:.0f} s", flush=True)
    write(rows, Path(args.out))


def write(rows: list[dict], out: Path) -> None:
    lines = ["# orpo plan's memory model against measured peaks (CPU)", "",
             "`.venv/bin/python bench/plan_check.py`: each run is `orpo train` for 2 steps in a fresh process; measured = "
             "the process's peak RSS (getrusage), predicted = `orpo plan --gpu cpu` for the same config "
             "(the plan's CPU runtime constant included; CPU heap kept: plan.CPU_HEAP_KEPT or CPU_HEAP_KEPT_SEVERAL x one "
             "pass's layer activations, fitted on r1-r10; r11-r13 are held out).", "",
             "| run | settings | measured GiB | predicted GiB | error | parts (GiB): weights / LoRA / grads / optimizer / activations / output layer / transient / CPU heap kept |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        p = r["parts_gib"]
        parts = " / ".join(f"{p[k]:.2f}" for k in ("weights", "lora", "gradients", "optimizer", "activations", "output_layer", "transient", "heap"))
        lines.append(f"| {r['run']} | {r['settings']} | {r['measured_gib']:.3f} | {r['predicted_gib']:.3f} | {100 * r['error']:+.1f}% | {parts} |")
    fitted = [r for r in rows if r["run"] not in HELD_OUT]
    held = [r for r in rows if r["run"] in HELD_OUT]
    lines.append("")
    for label, group in (("runs the heap shares were fitted on", fitted), ("held-out runs", held)):
        if group:
            worst = max(group, key=lambda r: abs(r["error"]))
            lines.append(f"Largest error, {label} ({len(group)}): {100 * abs(worst['error']):.1f}% ({worst['run']}).")
    lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
