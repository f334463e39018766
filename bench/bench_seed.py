"""The seed's script through TRL 1.16's experimental ORPOTrainer and through orpo's drop-in, one after the other:
pairs/s and peak RSS as ratios (orpo / TRL). Does changing the import line give orpo's speed, or a slower wrapper?

    python bench/bench_seed.py [--pairs 64] [--steps 6] [--rounds 2] [--setting seed|A]

Both sides run the seed's code (model, setup_chat_format, LoraConfig r16/alpha32/dropout 0.05 on the seven
projections, the seed's ORPOConfig: lr 8e-6, beta 0.1, max_length 1024, batch 2 x GA 4, warm-up 10, logging every
step) on SmolLM2-135M-Instruct in fp32, each in a process of its own, with the same arguments and steps. Where
the seed's settings cannot hold on this CPU both sides change alike: plain AdamW (not paged 8-bit), no bf16, no
4-bit, no evaluation during the timed steps. TRL 1.16 has no max_prompt_length (orpo keeps the seed's 512).
`--setting A` changes what bench_train.py's scenario A (the CLI path's benchmark) has: no gradient checkpointing,
max_length 512 (max_prompt_length 256), so the drop-in's ratios can be set beside the CLI path's.

Rows: the first pairs of hh-rlhf harmless-base (../shared/data, real multi-turn lengths), as the seed's map
leaves them for orpo (chosen and rejected rendered whole by the chat template, a raw prompt column); TRL gets the
same conversations in the one form it tokenizes correctly (the rendered prompt, completions ending at
<|im_end|>), so both train on the same tokens. Timing: from the first step's log line to the last's (the first
step, with its warm-up, is not counted); pairs/s = timed steps x 8 pairs / that time. Peak RSS: the worker's
maximum resident set (getrusage), model loading included (the same for both). Results: bench/results/seed.json, .md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
HH_RLHF = HERE.parents[1] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
TARGETS = ["up_proj", "down_proj", "gate_proj", "k_proj", "q_proj", "v_proj", "o_proj"]
SEED_ARGS = dict(learning_rate=8e-6, beta=0.1, lr_scheduler_type="linear", max_length=1024, per_device_train_batch_size=2,
                 per_device_eval_batch_size=2, gradient_accumulation_steps=4, num_train_epochs=1, logging_steps=1,
                 warmup_steps=10, report_to="none", optim="adamw_torch", bf16=False, seed=42)
SETTINGS = {  # what changes from the seed's arguments (both sides), and orpo's max_prompt_length
    "seed": ({}, 512),
    "A": ({"gradient_checkpointing": False, "max_length": 512}, 256),
}


def conversations(n: int) -> list[dict]:
    """hh-rlhf pairs as the seed's dataset holds them: chosen and rejected as whole message lists."""
    from orpo.data.formats import from_hh

    out = []
    with gzip.open(HH_RLHF, "rt") as handle:
        for i, line in enumerate(handle):
            pair = from_hh(json.loads(line), f"row {i}")
            out.append({"prompt": pair["prompt"][-1]["content"], "chosen": pair["prompt"] + pair["chosen"],
                        "rejected": pair["prompt"] + pair["rejected"]})
            if len(out) == n:
                return out
    return out


def seed_model():
    """The seed's model cell, on the CPU in fp32: the model, setup_chat_format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo import builtin_model_dir, setup_chat_format

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32)
    return setup_chat_format(model, tokenizer)


def worker(system: str, pairs: int, steps: int, setting: str, out: Path) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                marks.append(time.perf_counter())

    model, tokenizer = seed_model()
    rows = conversations(pairs)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM", target_modules=TARGETS)
    changes, prompt_length = SETTINGS[setting]
    args = dict(SEED_ARGS, **changes, max_steps=steps, output_dir=str(out / "run"))
    if system == "orpo":
        from orpo import ORPOConfig, ORPOTrainer

        data = [dict(r, chosen=tokenizer.apply_chat_template(r["chosen"], tokenize=False),
                     rejected=tokenizer.apply_chat_template(r["rejected"], tokenize=False)) for r in rows]  # the seed's map
        trainer = ORPOTrainer(model=model, args=ORPOConfig(max_prompt_length=prompt_length, **args), train_dataset=Dataset.from_list(data),
                              peft_config=lora, tokenizer=tokenizer, callbacks=[Clock()])
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        data = [{"prompt": tokenizer.apply_chat_template(r["chosen"][:-1], tokenize=False, add_generation_prompt=True),
                 "chosen": r["chosen"][-1]["content"] + "<|im_end|>", "rejected": r["rejected"][-1]["content"] + "<|im_end|>"} for r in rows]
        trainer = ORPOTrainer(model=model, args=ORPOConfig(**args), train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                              peft_config=lora, callbacks=[Clock()])
    trainer.train()
    timed = len(marks) - 1
    seconds = marks[-1] - marks[0]
    result = {"system": system, "timed_steps": timed, "seconds": seconds, "pairs_per_second": timed * 8 / seconds,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    (out / "result.json").write_text(json.dumps(result))


def run(system: str, pairs: int, steps: int, setting: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-seed-{system}-") as tmp:
        subprocess.run([sys.executable, __file__, "--worker", system, "--pairs", str(pairs), "--steps", str(steps), "--setting", setting,
                        "--out", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(tmp) / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="seed")
    parser.add_argument("--worker")
    parser.add_argument("--out")
    a = parser.parse_args()
    if a.worker:
        worker(a.worker, a.pairs, a.steps, a.setting, Path(a.out))
        return
    if not HH_RLHF.is_file():
        sys.exit(f"bench_seed: needs {HH_RLHF} (the shared data beside the project)")
    results: dict[str, list[dict]] = {"orpo": [], "trl": []}
    for r in range(a.rounds):
        for system in ("trl", "orpo") if r % 2 == 0 else ("orpo", "trl"):  # interleaved
            one = run(system, a.pairs, a.steps, a.setting)
            results[system].append(one)
            print(f"round {r + 1} {system}: {one['pairs_per_second']:.3f} pairs/s, peak RSS {one['peak_rss_gib']:.2f} GiB", flush=True)
    speed = {s: statistics.median(x["pairs_per_second"] for x in rs) for s, rs in results.items()}
    rss = {s: max(x["peak_rss_gib"] for x in rs) for s, rs in results.items()}
    summary = {"pairs_per_second": speed, "peak_rss_gib": rss, "speed_ratio": speed["orpo"] / speed["trl"],
               "memory_ratio": rss["orpo"] / rss["trl"], "runs": results, "args": vars(a), "cpu_count": os.cpu_count()}
    out = HERE / "results" / "seed.json"
    every = json.loads(out.read_text()) if out.is_file() else {}
    every[a.setting] = summary
    out.write_text(json.dumps(every, indent=2))
    lines = ["# The seed's script: orpo's ORPOTrainer vs TRL 1.16's", "",
             "`python bench/bench_seed.py --pairs P --steps S --rounds R --setting X` on this project's 2-core CPU; "
             "settings in the script's docstring (seed: the seed's arguments; A: as bench_train.py's scenario A).", "",
             "| setting | command | TRL pairs/s | orpo pairs/s | orpo / TRL speed | TRL peak RSS GiB | orpo peak RSS GiB | orpo / TRL memory |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in sorted(every.items()):
        args = s["args"]
        lines.append(f"| {name} | `--pairs {args['pairs']} --steps {args['steps']} --rounds {args['rounds']} --setting {name}` | "
                     f"{s['pairs_per_second']['trl']:.3f} | {s['pairs_per_second']['orpo']:.3f} | {s['speed_ratio']:.2f}x | "
                     f"{s['peak_rss_gib']['trl']:.2f} | {s['peak_rss_gib']['orpo']:.2f} | {s['memory_ratio']:.2f}x |")
    text = "\n".join(lines) + "\n"
    (HERE / "results" / "seed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
