"""Training speed and memory: orpo (packed layout), orpo (plain layout) and TRL 1.16's ORPOTrainer on the same
pairs, model and settings, in one run; each system in its own process, the runs interleaved.

    python bench/bench_train.py [--scenarios A,B,C,C_long,D] [--steps 3] [--warmup 1] [--rounds 2]

Scenarios (fp32, no gradient checkpointing, beta 0.1, AdamW lr 1e-5, clip 1.0):
  A       SmolLM2-135M-Instruct, LoRA r16/alpha32/dropout 0.05 on all linear layers, 2 pairs x GA 4,
          max_length 512, prompts 60-120 tokens, responses 40-200 tokens (random token ids)
  B       the same model, full fine-tuning, 2 pairs x GA 2
  C       random-init Llama with Llama 3's vocabulary (128,256), hidden 256, 4 layers, LoRA as A, 4 pairs,
          max_length 1,024, prompts 256-512, responses 128-512 (random token ids)
  C_long  C with prompts 60-120 and responses 700-900
  D       SmolLM2 LoRA as A on the shared hh-rlhf pairs (real multi-turn lengths, tokenized by orpo's pipeline
          with SmolLM2's chat template), max_prompt_length 256; needs ../shared/data

GPU scenarios (bench/gpu/check.py runs them; bf16, peak GPU memory allocated and reserved, MFU):
  gpu_8b_qlora  Llama-3-8B-shaped random model, QLoRA NF4 (double quantization, bf16 compute), gradient
                checkpointing, paged 8-bit AdamW, 2 pairs x GA 4, max_length 1,024, prompts 32-512, responses 32-640
  gpu_1b_lora   Llama-3.2-1B-shaped random model, LoRA, bf16, the same batch and lengths
  dry_8b_qlora, dry_1b_lora  the same settings on tiny shapes on the CPU (bench/gpu/check.py --dry-run)

Systems: orpo-packed, orpo-plain, trl (the default set); orpo-flex (packed, flex_attention's block mask; CUDA),
trl-liger (TRL with use_liger_kernel; CUDA); `SYSTEM@N` runs an orpo system with max_tokens_per_batch=N.

Every system gets the same token ids in the same step order: orpo through its own loop (`orpo.training.loop.train`,
with the data step replaced by the scenario's pairs), TRL through `ORPOTrainer.train()` (its dataset replaced
by the same ids in its own format, read in order). A step's time runs from the end of the previous optimizer
step to the end of this one (data, forward, backward, clipping, optimizer); the first `--warmup` steps are
not counted. Peak RSS is the worker process's maximum resident set (getrusage). pairs/s and tokens/s use the
step's pairs and their prompt+chosen plus prompt+rejected tokens, the same count for every system.
Results go to bench/results/train.json and train.md, with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
HH_RLHF = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
SYSTEMS = ("orpo-packed", "orpo-plain", "trl")  # the default set
ALL_SYSTEMS = ("orpo-packed", "orpo-flex", "orpo-plain", "trl", "trl-liger")


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str  # "smollm2" or "llama3-vocab"
    lora: bool
    batch: int
    ga: int
    max_length: int
    max_prompt_length: int
    prompt: tuple[int, int]  # token range (random ids)
    response: tuple[int, int]
    data: str = "random"  # or "hh-rlhf"
    device: str = "cpu"  # "cuda": peak GPU memory and MFU reported (bench/gpu/check.py)
    bf16: bool = False  # bf16 mixed precision (16-bit base weights)
    qlora: bool = False  # 4-bit NF4 base (double quantization, bf16 compute)
    grad_ckpt: bool = False
    optim: str = "adamw_torch"


SCENARIOS = {
    "A": Scenario("A", "smollm2", True, 2, 4, 512, 256, (60, 120), (40, 200)),
    "B": Scenario("B", "smollm2", False, 2, 2, 512, 256, (60, 120), (40, 200)),
    "C": Scenario("C", "llama3-vocab", True, 4, 1, 1024, 512, (256, 512), (128, 512)),
    "C_long": Scenario("C_long", "llama3-vocab", True, 4, 1, 1024, 512, (60, 120), (700, 900)),
    "D": Scenario("D", "smollm2", True, 2, 4, 512, 256, (0, 0), (0, 0), data="hh-rlhf"),
    # GPU (bench/gpu/check.py): random init in real dimensions, orpo-dpo-mix-like lengths, the reference recipe's settings
    "gpu_8b_qlora": Scenario("gpu_8b_qlora", "llama3-8b-shape", True, 2, 4, 1024, 512, (32, 512), (32, 640),
                             device="cuda", bf16=True, qlora=True, grad_ckpt=True, optim="paged_adamw_8bit"),
    "gpu_1b_lora": Scenario("gpu_1b_lora", "llama3-1b-shape", True, 2, 4, 1024, 512, (32, 512), (32, 640),
                            device="cuda", bf16=True),
    # the same code paths on the CPU with tiny shapes (bench/gpu/check.py --dry-run)
    "dry_8b_qlora": Scenario("dry_8b_qlora", "tiny", True, 2, 2, 96, 48, (8, 48), (8, 40), bf16=True, qlora=True,
                             grad_ckpt=True, optim="paged_adamw_8bit"),
    "dry_1b_lora": Scenario("dry_1b_lora", "tiny-tied", True, 2, 2, 96, 48, (8, 48), (8, 40), bf16=True),
}
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, tied, vocabulary: Llama 3 8B, Llama 3.2 1B, tiny stand-ins
    "llama3-vocab": (256, 1024, 4, 4, 4, False, 128_256),
    "llama3-8b-shape": (4096, 14336, 32, 32, 8, False, 128_256),
    "llama3-1b-shape": (2048, 8192, 16, 32, 8, True, 128_256),
    "tiny": (64, 128, 2, 4, 2, False, 49_152),
    "tiny-tied": (64, 128, 2, 4, 2, True, 49_152),
}
GPU_ONLY = {"orpo-flex": "flex_attention trains on CUDA only", "trl-liger": "Liger's kernels are Triton (CUDA)"}
# Dense bf16 tensor-core peak per GPU (TFLOP/s, NVIDIA's data sheets: their "with sparsity" figure halved), matched
# in order against torch.cuda.get_device_name(): the first pattern found wins, so a form factor comes before its
# family. A card not listed gets no MFU rather than another card's peak (an H100 PCIe is not an SXM).
PEAK_BF16_TFLOPS = (
    (r"\bMIG\b", None),  # a slice of a card: its share of the peak is not known here
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b.*\b(SXM|HBM3)", 989.4),  # the SXM5 card reports itself as "NVIDIA H100 80GB HBM3"
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.4),  # the SXM card: "NVIDIA H200"
    (r"\bGH200\b", 989.4),
    (r"\bA100\b", 312.0),  # SXM4 and PCIe, 40 and 80 GB alike
    (r"\bL40S\b", 362.0),
    (r"\bA40\b", 149.7),
    (r"\bA10\b", 125.0),
    (r"\bL4\b", 121.0),
)


# ---------------------------------------------------------------- inputs (parent)


def llama_config(shape: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, tied, vocab = SHAPES[shape]
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                       tie_word_embeddings=tied, rope_theta=500_000.0)


def tokenizer_dir() -> Path:
    """SmolLM2's tokenizer: ORPO_BENCH_TOKENIZER, else the copy bench/gpu/prepare.py carries to a GPU machine
    (.gpu/tokenizer), else the embedded model's."""
    if os.environ.get("ORPO_BENCH_TOKENIZER"):
        return Path(os.environ["ORPO_BENCH_TOKENIZER"])
    carried = HERE.parent / ".gpu" / "tokenizer"
    if (carried / "tokenizer_config.json").is_file():
        return carried
    from orpo.model.builtin import builtin_model_dir

    return builtin_model_dir()


def random_llama_dir(cache: Path, shape: str) -> Path:
    """A random-init Llama of `shape`, saved once (seed 0; bf16 for the real shapes, made on the GPU when there
    is one), with SmolLM2's tokenizer (its ids fit every shape's vocabulary)."""
    target = cache / shape
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    real = SHAPES[shape][0] >= 2048
    dtype = torch.bfloat16 if real else torch.float32
    with torch.device("cuda" if real and torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype)  # made in dtype: 16 GB for 8B
    tmp = cache / f".{shape}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # this process only starts the workers: hand the memory back
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(tmp)
    tmp.rename(target)  # a folder with config.json is complete
    return target


def random_pairs(s: Scenario, n: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(16, vocab) for _ in range(rng.randint(lo, hi))]

    pairs = []
    for _ in range(n):
        prompt = ids(*s.prompt)[: s.max_prompt_length]
        budget = s.max_length - len(prompt)
        pairs.append({"prompt_ids": prompt, "chosen_ids": ids(*s.response)[:budget], "rejected_ids": ids(*s.response)[:budget]})
    return pairs


def hh_rlhf_pairs(s: Scenario, n: int) -> list[dict]:
    """The shared hh-rlhf pairs through orpo's own pipeline (format detection, chat template, truncation)."""
    from orpo.config import load_config
    from orpo.data.pairs import load_pairs
    from orpo.model.load import load_tokenizer

    config = load_config(None, [f"data.path={HH_RLHF}", "data.test_size=0", "eval_steps=null", "eval_on_start=false",
                                f"max_length={s.max_length}", f"max_prompt_length={s.max_prompt_length}", "data.cache=false"])
    tokenizer, _ = load_tokenizer(config)
    train, _, _, _ = load_pairs(config, tokenizer)
    rows = train.select(range(n))
    return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]


def model_source(s: Scenario, cache: Path) -> str:
    return "builtin" if s.model == "smollm2" else str(random_llama_dir(cache, s.model))


# ---------------------------------------------------------------- workers (one process per run)


def parse_system(system: str) -> tuple[str, int | None]:
    """"orpo-packed@2048" -> ("orpo-packed", 2048): a system and its max_tokens_per_batch (None: the default)."""
    name, _, budget = system.partition("@")
    if name not in ALL_SYSTEMS or (budget and (not name.startswith("orpo") or not budget.isdigit())):
        raise SystemExit(f"unknown system {system!r}: one of {', '.join(ALL_SYSTEMS)}, an orpo one with @TOKENS")
    return name, int(budget) if budget else None


def orpo_settings(s: Scenario, system: str, source: str, steps: int, out: Path) -> list[str]:
    """The config overrides an orpo system trains the scenario with (the worker's, and the plan's prediction)."""
    name, budget = parse_system(system)
    layout = "plain" if name == "orpo-plain" else "packed"
    kernel = "flex_attention" if name == "orpo-flex" else "sdpa"
    return [
        f"model.name_or_path={source}", f"model.attn_implementation={kernel}", f"lora.enabled={str(s.lora).lower()}",
        "lora.r=16", "lora.alpha=32", "lora.dropout=0.05", "lora.target_modules=all-linear",
        "data.test_size=0", "eval_steps=null", "eval_on_start=false", f"layout={layout}",
        f"model.load_in_4bit={str(s.qlora).lower()}", "model.bnb_4bit_compute_dtype=bfloat16",
        f"bf16={str(s.bf16).lower()}", f"gradient_checkpointing={str(s.grad_ckpt).lower()}", f"optim={s.optim}",
        f"max_tokens_per_batch={budget if budget else 'null'}",
        f"max_length={s.max_length}", f"max_prompt_length={s.max_prompt_length}",
        f"per_device_train_batch_size={s.batch}", f"gradient_accumulation_steps={s.ga}", f"max_steps={steps}",
        "learning_rate=1e-5", "warmup_steps=0", "warmup_ratio=0", "lr_scheduler_type=linear", "max_grad_norm=1.0",
        "logging_steps=1", "seed=0", f"output_dir={out / 'run'}",
    ]


def orpo_worker(s: Scenario, system: str, source: str, pairs: list[dict], steps: int, out: Path) -> list[float]:
    import datasets
    import torch

    import orpo.training.loop as loop
    from orpo.config import load_config
    from orpo.data.sources import DataReport

    n = len(pairs)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()  # PairSampler's epoch-0 order
    rows = [None] * n
    for j, index in enumerate(order):  # so that the sampler reads pairs[0], pairs[1], ... in turn
        rows[index] = pairs[j]
    dataset = datasets.Dataset.from_list(rows)
    # the scenario's pairs, whatever else the loop hands its data step (*rest: rows given through the API)
    loop.load_checked = lambda config, tokenizer, *rest: (dataset, None, None, DataReport())
    config = load_config(None, orpo_settings(s, system, source, steps, out))
    loop.train(config)
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [line["seconds_per_step"] for line in lines if "seconds_per_step" in line]


def trl_row(p: dict) -> dict:
    """A tokenized pair (prompt_ids, chosen_ids, rejected_ids) in the columns TRL's ORPOTrainer reads after its own
    tokenization, so that TRL trains on exactly the ids orpo does."""
    prompt, row = p["prompt_ids"], {"prompt_input_ids": p["prompt_ids"], "prompt_attention_mask": [1] * len(p["prompt_ids"])}
    for side in ("chosen", "rejected"):
        ids = prompt + p[f"{side}_ids"]
        row |= {f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                f"{side}_labels": [-100] * len(prompt) + p[f"{side}_ids"]}
    return row


def trl_worker(s: Scenario, source: str, pairs: list[dict], steps: int, out: Path, liger: bool = False) -> list[float]:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from orpo.model.builtin import builtin_model_dir

    path = str(builtin_model_dir()) if source == "builtin" else source
    dtype = torch.bfloat16 if s.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {}
    if s.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **kwargs)
    if s.device == "cuda" and not s.qlora:
        model = model.to("cuda")
    if s.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.grad_ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if s.lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = ORPOConfig(
        output_dir=str(out / "trl"), beta=0.1, learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=0,
        max_grad_norm=1.0, per_device_train_batch_size=s.batch, gradient_accumulation_steps=s.ga,
        max_steps=steps, max_length=s.max_length, bf16=s.bf16, gradient_checkpointing=s.grad_ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False}, use_liger_kernel=liger,
        disable_dropout=False, use_cpu=s.device == "cpu", logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
        remove_unused_columns=False, optim=s.optim,
    )
    stub = datasets.Dataset.from_list([{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}])
    trainer = ORPOTrainer(model=model, args=args, train_dataset=stub, processing_class=tokenizer)

    trainer.train_dataset = datasets.Dataset.from_list([trl_row(p) for p in pairs])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    trainer.add_callback(StepTimes())
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def worker(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", required=True)
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    s = SCENARIOS[a.scenario]
    pairs = json.loads(Path(a.pairs).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        if a.system.startswith("trl"):
            times = trl_worker(s, a.source, pairs, a.steps, Path(tmp), liger=a.system == "trl-liger")
        else:
            times = orpo_worker(s, a.system, a.source, pairs, a.steps, Path(tmp))
    out = {"step_seconds": times}
    if s.device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["reserved_gpu_gib"] = torch.cuda.max_memory_reserved() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    Path(a.result).write_text(json.dumps(out))


# ---------------------------------------------------------------- parent: interleaved runs, table


def run_one(system: str, s: Scenario, source: str, pairs_file: Path, steps: int, timeout: int) -> dict:
    """One worker process: its step times and peak RSS (getrusage of the reaped child), or {"error": why}."""
    result = pairs_file.with_name(f"result-{system}-{s.name}.json")
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", "--system", system, "--scenario", s.name, "--source", source,
           "--pairs", str(pairs_file), "--steps", str(steps), "--result", str(result)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-3000:]
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        why = f"timed out after {timeout} s" if wall > timeout else f"exit {proc.returncode}"
        last = [line for line in tail.splitlines() if line.strip()][-1:] or [""]
        print(f"{system} {s.name} failed ({why}):\n{tail}", flush=True)
        return {"error": f"{why}: {last[0][:200]}", "wall_seconds": wall}
    out = json.loads(result.read_text())
    result.unlink()
    out["peak_rss_gib"] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    out["wall_seconds"] = wall
    return out


def machine() -> dict:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "orpo"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "-"
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": int(os.environ.get("BENCH_THREADS", "2")),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), **versions}


def forward_flops_per_token(shape: str, context: float) -> float:
    """Forward FLOPs of one token of a Llama `shape` attending to `context` tokens: projections, attention
    scores and values, output layer."""
    hidden, inter, layers, heads, kv, _, vocab = SHAPES[shape]
    kv_dim = hidden // heads * kv
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter)
    return 2 * linear + layers * 4 * hidden * context + 2 * hidden * vocab


def model_flops_per_step(s: Scenario, system: str, pairs: list[dict]) -> float:
    """Training FLOPs one step needs in the system's layout (no padding counted): forward, plus the backward's
    activation gradients (the base weights are frozen under LoRA/QLoRA: one more forward's worth)."""
    total = 0.0
    packed = parse_system(system)[0] in ("orpo-packed", "orpo-flex")
    for p in pairs:
        prompt, chosen, rejected = (len(p[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        if packed:  # prompt once; each response attends to the prompt and itself
            seqs = [(prompt + chosen, (prompt + chosen) / 2), (rejected, prompt + rejected / 2)]
        else:
            seqs = [(prompt + chosen, (prompt + chosen) / 2), (prompt + rejected, (prompt + rejected) / 2)]
        total += sum(n * forward_flops_per_token(s.model, ctx) for n, ctx in seqs)
    return 2 * total / len(pairs) * s.batch * s.ga


def plan_figures(s: Scenario, system: str, source: str, pairs: list[dict], steps: int, gpu: str | None) -> dict:
    """What `orpo plan`'s model predicts for this run (orpo.training.plan.predict): peak and, on a GPU, s/step; TRL's
    systems get the plan's TRL side. A prediction that fails is recorded, not raised."""
    try:
        from orpo.config import load_config
        from orpo.training.plan import predict

        orpo_system = system if system.startswith("orpo") else "orpo-plain"
        config = load_config(None, orpo_settings(s, orpo_system, source, steps, Path(tempfile.gettempdir()) / "plan"))
        import torch

        lengths = [None] * len(pairs)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
        for j, index in enumerate(order):  # the order orpo_worker gives them, so the plan's sampler reads them in turn
            lengths[index] = (len(pairs[j]["prompt_ids"]), len(pairs[j]["chosen_ids"]), len(pairs[j]["rejected_ids"]))
        return predict(config, lengths, gpu)["trl" if system.startswith("trl") else "orpo"]
    except Exception as exc:  # noqa: BLE001 - the measurement stands without the prediction
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def summarise(s: Scenario, system: str, rs: list[dict], timed_pairs: list[dict], warmup: int, steps: int,
              source: str | None = None, pairs: list[dict] | None = None) -> dict:
    """One system's figures over its runs: medians of the timed steps, and on a GPU peak memory and MFU."""
    failed = [r["error"] for r in rs if "error" in r]
    rs = [r for r in rs if "error" not in r]
    if not rs:
        return {"error": failed[0]}
    step_pairs = s.batch * s.ga
    tokens_per_step = sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in timed_pairs) / steps
    med = statistics.median(t for r in rs for t in r["step_seconds"][warmup:])
    out = {"s_per_step": med, "pairs_per_s": step_pairs / med, "tokens_per_s": tokens_per_step / med,
           "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in rs),
           "step_seconds": [r["step_seconds"] for r in rs], "peak_rss_each": [r["peak_rss_gib"] for r in rs],
           "wall_seconds": [round(r["wall_seconds"], 1) for r in rs]}
    if s.device == "cuda":
        gpu = rs[0]["gpu"]
        peak = peak_tflops(gpu)
        flops = model_flops_per_step(s, system, timed_pairs)
        out |= {"gpu": gpu, "peak_gpu_gib": statistics.median(r["peak_gpu_gib"] for r in rs),
                "reserved_gpu_gib": statistics.median(r["reserved_gpu_gib"] for r in rs),
                "model_tflop_per_step": flops / 1e12, "peak_tflops": peak,
                "mfu": flops / med / (peak * 1e12) if peak else None}
        if not peak:
            out["mfu_note"] = f"unknown card {gpu!r}: MFU not computed (BENCH_PEAK_TFLOPS sets its peak)"
    if source is not None and pairs is not None:  # orpo plan's prediction beside the measurement
        out["plan"] = plan_figures(s, system, source, pairs, warmup + steps, out.get("gpu"))
    return out


def peak_tflops(gpu: str) -> float | None:
    """The card's dense bf16 peak in TFLOP/s: BENCH_PEAK_TFLOPS when set, else PEAK_BF16_TFLOPS by device name;
    None for a card not listed."""
    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"])
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, gpu, re.IGNORECASE)), None)


def table(results: dict, order: list[str]) -> str:
    gpu = any("peak_gpu_gib" in r for per in results.values() for r in per.values())
    extra = " peak GPU GiB (reserved) | GPU mem vs TRL | MFU | orpo plan: GiB (tensors), s/step |" if gpu else " orpo plan: RSS GiB |"
    head = ("| scenario | system | s/step (median) | pairs/s | tokens/s | peak RSS GiB | pairs/s vs TRL | RSS vs TRL |"
            + extra + "\n|" + "---|" * (8 + (4 if gpu else 1)))
    lines = [head]
    for name in order:
        trl = results[name].get("trl")
        trl = trl if trl and "error" not in trl else None
        for system, r in results[name].items():
            if "error" in r:
                lines.append(f"| {name} | {system} | {r['error']} |" + " |" * (6 + (4 if gpu else 1)))
                continue
            speed = f"{trl['s_per_step'] / r['s_per_step']:.2f}x" if trl else "-"
            mem = f"{r['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x" if trl else "-"
            row = (f"| {name} | {system} | {r['s_per_step']:.2f} | {r['pairs_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                   f"{r['peak_rss_gib']:.2f} | {speed} | {mem} |")
            if gpu and "peak_gpu_gib" in r:
                gmem = f"{r['peak_gpu_gib'] / trl['peak_gpu_gib']:.2f}x" if trl and "peak_gpu_gib" in trl else "-"
                mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "unknown card" if r.get("mfu_note") else "-"
                row += f" {r['peak_gpu_gib']:.1f} ({r['reserved_gpu_gib']:.1f}) | {gmem} | {mfu} |"
            elif gpu:
                row += " - | - | - |"
            plan = r.get("plan") or {}
            if "error" in plan or not plan:
                row += f" {plan.get('error', '-')} |"
            elif gpu:
                row += f" {plan['tensors_gib']:.1f}, {plan.get('s_per_step', float('nan')):.2f} (estimate) |"
            else:
                row += f" {plan['peak_gib']:.2f} |"
            lines.append(row)
    return "\n".join(lines)


def write_results(a, inputs: dict, runs: dict, skipped: dict, host: dict) -> str:
    """bench JSON and markdown from the runs so far (rewritten after every run: a cut-off bench keeps its
    finished runs); returns the table."""
    results: dict = {}
    for name, per_system in runs.items():
        s, source, _, pairs = inputs[name]
        timed_pairs = pairs[a.warmup * s.batch * s.ga :]
        results[name] = {system: summarise(s, system, rs, timed_pairs, a.warmup, a.steps, source, pairs[: (a.warmup + a.steps) * s.batch * s.ga])
                         for system, rs in per_system.items() if rs}
        results[name] |= {system: {"error": f"skipped: {why}"} for system, why in skipped.get(name, {}).items()}
    command = "python bench/bench_train.py " + " ".join(sys.argv[1:])
    record = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": host,
              "scenarios": {n: asdict(inputs[n][0]) for n in inputs}, "warmup": a.warmup, "steps": a.steps,
              "rounds": a.rounds, "results": results}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    text = table(results, list(inputs))
    m = record["machine"]
    out.with_suffix(".md").write_text(
        f"# Training benchmark\n\n`{command}` on {record['date']}: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, "
        f"{m['memory_gib']} GiB; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, trl {m['trl']}.\n"
        f"{a.rounds} interleaved runs per system, {a.warmup} warm-up + {a.steps} timed steps each; medians.\n\n{text}\n")
    return text


def main() -> None:
    if "--worker" in sys.argv:
        sys.argv.remove("--worker")
        return worker(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="A,B,C,C_long,D")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not timed")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each system per scenario, interleaved")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds one run may take")
    ap.add_argument("--out", default=str(HERE / "results" / "train"))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "orpo-bench"))
    a = ap.parse_args()
    names = a.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}: one of {', '.join(SCENARIOS)}")
    systems = a.systems.split(",")
    for system in systems:
        parse_system(system)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for name in names:
        s = SCENARIOS[name]
        n = (a.warmup + a.steps) * s.batch * s.ga
        if s.data == "hh-rlhf":
            if not HH_RLHF.exists():
                print(f"skipping {name}: {HH_RLHF} not found")
                continue
            pairs = hh_rlhf_pairs(s, n)
        else:
            vocab = 49_152 if s.model == "smollm2" else SHAPES[s.model][6]
            pairs = random_pairs(s, n, vocab, seed=zlib.crc32(name.encode()))
        path = cache / f"pairs-{name}.json"
        path.write_text(json.dumps(pairs))
        inputs[name] = (s, model_source(s, cache), path, pairs)
    import torch

    cuda = torch.cuda.is_available()
    skipped = {name: {x: GPU_ONLY[parse_system(x)[0]] for x in systems if parse_system(x)[0] in GPU_ONLY and not cuda}
               for name in inputs}
    runs: dict = {name: {system: [] for system in systems if system not in skipped[name]} for name in inputs}
    host = machine()
    for rnd in range(a.rounds):
        for name, (s, source, path, _) in inputs.items():
            live = list(runs[name])
            rotated = live[rnd % len(live):] + live[: rnd % len(live)]  # a different system first each round
            for system in rotated:
                r = run_one(system, s, source, path, a.warmup + a.steps, a.timeout)
                runs[name][system].append(r)
                if "error" not in r:
                    timed = r["step_seconds"][a.warmup:]
                    print(f"round {rnd + 1} {name:7s} {system:12s} s/step {statistics.median(timed):7.2f}  "
                          f"peak RSS {r['peak_rss_gib']:5.2f} GiB", flush=True)
                write_results(a, inputs, runs, skipped, host)
    print(write_results(a, inputs, runs, skipped, host))


if __name__ == "__main__":
    main()
