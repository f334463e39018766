"""`orpo plan`: what a training job needs (peak memory by part, time per step and per run) on each GPU, the
same job under TRL's ORPOTrainer, a verdict per GPU and the smallest changes that make a job fit, before any
model is loaded.

It reads the config, the model's config.json (a local folder, or the Hub's config file alone) and, when the data
can be read, the token length of every training pair (through the tokenized-data cache), lays each optimizer
step's pairs into forward passes exactly as the loop will (layout.pack, the same sampler), and sizes the
largest with the memory model (training/memory.py). Without the data it takes every pair at max_length: the
worst case, said in the output.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import Config, ConfigError
from ..data.pairs import PairSampler
from .gpus import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, EFFICIENCY, EFFICIENCY_SOURCE, GPUS, Gpu, find_gpu
from .layout import ONE_ROW_KERNELS, pack, token_budget
from .logps import default_chunk
from .memory import GIB, LINEARS, Arch, Parts, Pass, Setup, peak, trainable_tensors

log = logging.getLogger(__name__)

# What a CPU process holds besides the model and its tensors: Python, torch, transformers, datasets, the
# tokenizer and the data (RSS of `orpo train` up to the model's loading). Measured on this project's CPU host
# (bench/plan_check.py prints it); the CPU's counterpart of a GPU's CUDA context.
CPU_RUNTIME_GIB = 0.45
# glibc's heap keeps much of what the passes free, resident (tensors under its mmap threshold, at most 32 MiB, live
# there, and it returns freed memory only from the heap's top): a share of the largest pass's layer activations.
# The share is larger when a step runs several passes that each hold every layer's activations (packed micro-batches
# or accumulation without checkpointing: holes of many sizes); bench/results/plan-cpu-split.md measures the heap's
# free part at each run's peak. Both fitted on bench/plan_check.py's runs r1-r10; the held-out r11-r13 miss by up
# to 19% (the heap's extent depends on the order and sizes of all that was freed before, which is not simulated).
CPU_HEAP_KEPT = 0.75
CPU_HEAP_KEPT_SEVERAL = 1.0
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


class PlanError(ValueError):
    """A plan that cannot be made (the model's config unreadable, an unknown GPU): one line for the user."""


@dataclass(frozen=True)
class Lengths:
    """Token lengths (prompt, chosen, rejected) of the training pairs, and where they come from."""

    pairs: list[tuple[int, int, int]]
    source: str

    def cut(self, max_length: int, max_prompt_length: int) -> Lengths:
        """The lengths under a shorter max_length / max_prompt_length (the prompt keeps its end, responses are cut)."""
        pairs = []
        for p, c, n in self.pairs:
            p = min(p, max_prompt_length)
            pairs.append((p, min(c, max_length - p), min(n, max_length - p)))
        return Lengths(pairs, self.source)


@dataclass
class Target:
    """One device's plan: peak by part for orpo and for TRL, verdict, time, suggestions."""

    name: str
    memory_gib: float | None  # None: the CPU (no fixed capacity)
    orpo: Parts
    trl: Parts
    peak_gib: float
    trl_peak_gib: float
    fits: bool | None
    step_seconds: float | None = None
    run_hours: float | None = None
    efficiency: float | None = None
    changes: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "memory_gib": self.memory_gib, "peak_gib": round(self.peak_gib, 2),
                "trl_peak_gib": round(self.trl_peak_gib, 2), "fits": self.fits,
                "margin_gib": None if self.memory_gib is None else round(self.memory_gib - self.peak_gib, 2),
                "parts_gib": {k: round(v / GIB, 3) for k, v in self.orpo.as_dict().items()},
                "trl_parts_gib": {k: round(v / GIB, 3) for k, v in self.trl.as_dict().items()},
                "step_seconds": self.step_seconds, "run_hours": self.run_hours, "efficiency": self.efficiency,
                "changes": self.changes, "notes": self.notes}


@dataclass
class Plan:
    """The whole plan, as `orpo plan --json` prints it."""

    model: str
    arch: Arch
    params: int
    trainable: int
    lengths_source: str
    pairs: int
    steps: int
    tokens_per_step: float
    flops_per_step: float
    passes_per_step: float
    num_gpus: int
    engine: str
    targets: list[Target]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "arch": self.arch.__dict__, "params": self.params, "trainable": self.trainable,
                "lengths": self.lengths_source, "pairs": self.pairs, "steps": self.steps,
                "tokens_per_step": round(self.tokens_per_step, 1), "tflop_per_step": round(self.flops_per_step / 1e12, 3),
                "passes_per_step": round(self.passes_per_step, 2), "num_gpus": self.num_gpus, "engine": self.engine,
                "efficiency_source": EFFICIENCY_SOURCE, "targets": [t.as_dict() for t in self.targets], "notes": self.notes}

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)


def read_arch(config: Config) -> Arch:
    """The model's shape from its config.json alone (no weights); PlanError when it cannot be read."""
    from transformers import AutoConfig

    from ..hub_errors import hub_errors
    from ..model.load import model_source

    name = config.model.name_or_path
    try:
        source, kwargs = model_source(config)
        with hub_errors(source, revision=config.model.revision):
            model_config = AutoConfig.from_pretrained(source, **kwargs)
        return Arch.from_config(model_config)
    except Exception as exc:  # noqa: BLE001 - any reason the config cannot be read is one line for the user
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PlanError(f"cannot read the model config of {name}: {reason[:300]}") from None


def pair_lengths(dataset) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of each tokenized pair."""
    columns = (dataset[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return [(len(p), len(c), len(r)) for p, c, r in zip(*columns, strict=True)]


def read_lengths(config: Config) -> tuple[Lengths, int]:
    """(token lengths of the training pairs, ChatML tokens the run adds) from the data, or max_length for every
    pair when the data or tokenizer cannot be read (said in Lengths.source)."""
    try:
        from ..data.doctor import load_checked
        from ..model.load import load_tokenizer

        tokenizer, new_ids = load_tokenizer(config)
        quiet = logging.getLogger("orpo.data")
        level, quiet.level = quiet.level, logging.ERROR
        try:
            train, _, _, _ = load_checked(config.model_copy(update={"data": config.data.model_copy(update={"allow_errors": True})}), tokenizer)
        finally:
            quiet.level = level
        pairs = pair_lengths(train)
        return Lengths(pairs, f"{len(pairs):,} training pairs, tokenized"), len(new_ids)
    except Exception as exc:  # noqa: BLE001 - the plan goes on at the worst case, and says why
        reason = " ".join(str(exc).split())[:160]
        return worst_case(config, f"every pair at max_length (data not read: {reason})"), 0


def worst_case(config: Config, source: str) -> Lengths:
    """data.num_samples pairs (1,000 when unset), each at max_prompt_length and max_length."""
    p = config.max_prompt_length
    return Lengths([(p, config.max_length - p, config.max_length - p)] * (config.data.num_samples or 1000), source)


def setup_for(config: Config, arch: Arch, device: str, gpu: Gpu | None, new_tokens: int) -> tuple[Setup, list[str]]:
    """The memory-relevant settings of `config` on `device` ("cpu" or "cuda"), as the run would resolve them."""
    notes = []
    bf16, fp16 = config.bf16, config.fp16
    if device == "cuda" and "bf16" not in config.model_fields_set and not fp16:
        bf16 = gpu is None or gpu.bf16  # TRL's default: bf16 where the GPU has it
    if device == "cuda" and gpu is not None and bf16 and not gpu.bf16:
        notes.append(f"{gpu.name} has no bf16: planned in fp16 (set fp16=true, bf16=false)")
        bf16, fp16 = False, True
    half = 2 if (bf16 or fp16) else 4
    dtype = {"float32": 4, "bfloat16": 2, "float16": 2}.get(config.model.dtype, half)
    autocast = bf16 or fp16
    kernel = config.model.attn_implementation or "sdpa"
    if device == "cpu" and config.layout == "packed" and kernel == "sdpa":
        kernel = "orpo_split_sdpa"
    targets = LINEARS if config.lora.target_modules == "all-linear" else tuple(config.lora.target_modules)
    setup = Setup(
        lora=config.lora.enabled, r=config.lora.r, targets=targets, dropout=config.lora.dropout, new_tokens=new_tokens,
        weight_bytes=dtype, load_in_4bit=config.model.load_in_4bit, double_quant=config.model.bnb_4bit_use_double_quant,
        residual_bytes=4 if config.model.load_in_4bit else dtype, linear_bytes=2 if autocast else dtype,
        gradient_checkpointing=config.gradient_checkpointing, optim=config.optim, layout=config.layout, kernel=kernel,
        chunk=config.logps_chunk_size or default_chunk(arch.vocab), nll_on_prompt=config.nll_on_prompt)
    return setup, notes


def lay_out(config: Config, lengths: Lengths, device: str, kernel: str, world: int, trl: bool = False) -> list[list[Pass]]:
    """Every optimizer step of one epoch as the forward passes of process 0: the sampler's micro-batches, packed
    under the token budget (packed) or one padded pass each (plain, and TRL)."""
    batch, accumulate = config.per_device_train_batch_size, config.gradient_accumulation_steps
    sampler = PairSampler(len(lengths.pairs), batch, config.seed, 0, world)
    groups = [[lengths.pairs[i] for i in g] for g in sampler.epoch(0)]
    budget = token_budget(config, batch, device)
    steps = []
    for s in range(0, len(groups), accumulate):
        micro = [g for g in groups[s : s + accumulate] if g]
        if config.layout == "plain" or trl:
            steps.append([plain_pass(g) for g in micro])
            continue
        pairs = [p for g in micro for p in g]
        passes = []
        for rows in pack([sum(p) for p in pairs], budget, kernel in ONE_ROW_KERNELS):
            length = max(sum(sum(pairs[i]) for i in row) for row in rows)
            passes.append(Pass(len(rows), length, tuple(pairs[i] for row in rows for i in row), packed=True))
        steps.append(passes)
    return steps


def plain_pass(group: list[tuple[int, int, int]]) -> Pass:
    """[chosen; rejected] rows padded to the longest prompt+response."""
    seqs = [p + c for p, c, _ in group] + [p + n for p, _, n in group]
    return Pass(len(seqs), max(seqs), tuple(group), packed=False, padded=len(set(seqs)) > 1)


def flops(arch: Arch, setup: Setup, steps: list[list[Pass]]) -> float:
    """Model FLOPs of a mean step: 2 per weight per token forward, attention over each token's context, the
    output layer per scored token; the backward 2x the forward (full fine-tuning) or 1x (frozen weights:
    activation gradients only), plus one forward more under gradient checkpointing."""
    active = arch.layers * arch.layer_linear_params()
    if arch.experts > 1:
        active -= arch.layers * 3 * arch.hidden * arch.intermediate * (arch.experts - arch.experts_per_token)
    q = arch.heads * arch.head_dim
    total = 0.0
    for passes in steps:
        for p in passes:
            if p.packed:
                context = sum((pp + c) ** 2 / 2 + n * (pp + n / 2) for pp, c, n in p.pairs)
                tokens = sum(sum(x) for x in p.pairs)
            else:
                context = sum((pp + max(c, n)) ** 2 for pp, c, n in p.pairs)  # padded rows attend as if full
                tokens = p.tokens
            forward = 2 * active * tokens + 4 * q * arch.layers * context + 2 * arch.hidden * arch.vocab * p.scored
            total += forward * ((2 if setup.lora else 3) + (1 if setup.gradient_checkpointing else 0))
    return total / max(len(steps), 1)


def step_seconds(work: float, gpu: Gpu, setup: Setup) -> tuple[float, float]:
    """(seconds, efficiency) of a step of `work` FLOPs on `gpu` at the estimated share of its peak."""
    efficiency = EFFICIENCY["4-bit" if setup.load_in_4bit else "16-bit"]
    return round(work / (gpu.tflops * 1e12 * efficiency), 3), efficiency


def shards(engine: str, world: int) -> dict[str, int]:
    """How the engine divides weights, gradients and optimizer states over `world` processes."""
    if world == 1 or engine == "ddp":
        return {}
    if engine == "zero2":
        return {"gradients": world, "optimizer": world}
    return {"weights": world, "gradients": world, "optimizer": world}  # fsdp2, zero3


def size(config: Config, arch: Arch, lengths: Lengths, new_tokens: int, device: str, gpu: Gpu | None, world: int, engine: str):
    """(orpo's Parts, TRL's Parts, notes, orpo's steps, its Setup) for one device."""
    setup, notes = setup_for(config, arch, device, gpu, new_tokens)
    steps = lay_out(config, lengths, device, setup.kernel, world)
    runtime = int((CUDA_CONTEXT_GIB if device == "cuda" else CPU_RUNTIME_GIB) * GIB)
    divide = shards(engine, world)
    mine = peak(arch, setup, steps, runtime, divide, heap=heap_share(device, setup, steps))
    trl_setup = replace(setup, code="stock", layout="plain", kernel=config.model.attn_implementation or "sdpa")
    trl_steps = lay_out(config, lengths, device, trl_setup.kernel, world, trl=True)
    theirs = peak(arch, trl_setup, trl_steps, runtime, divide, heap=heap_share(device, trl_setup, trl_steps))
    notes += mine.notes
    return mine, theirs, notes, steps, setup


def heap_share(device: str, setup: Setup, steps: list[list[Pass]]) -> float:
    """The share of the largest pass's layer activations glibc's heap keeps resident (0 on a GPU)."""
    if device == "cuda":
        return 0.0
    several = not setup.gradient_checkpointing and any(len(passes) > 1 for passes in steps)
    return CPU_HEAP_KEPT_SEVERAL if several else CPU_HEAP_KEPT


def total_gib(parts: Parts, device: str) -> float:
    """The peak a device must hold: on a GPU the caching allocator's slack on top of what tensors use."""
    if device == "cpu":
        return parts.total / GIB
    return (parts.runtime + (parts.total - parts.runtime) * (1 + ALLOCATOR_SLACK)) / GIB


# Changes tried for a job that does not fit, in the order they are suggested (the least change to the job first).
def candidate_changes(config: Config) -> list[tuple[str, dict, int]]:
    """(what to say, config overrides, GPUs) for each change worth trying on `config`."""
    out = []
    if not config.gradient_checkpointing:
        out.append(("gradient_checkpointing=true", {"gradient_checkpointing": True}, 0))
    b, g = config.per_device_train_batch_size, config.gradient_accumulation_steps
    while b > 1:
        b, g = b // 2, g * 2
        out.append((f"per_device_train_batch_size={b} gradient_accumulation_steps={g} (same pairs per step)",
                    {"per_device_train_batch_size": b, "gradient_accumulation_steps": g}, 0))
    if config.layout == "packed":
        budget = token_budget(config, config.per_device_train_batch_size, "cuda")
        while budget > config.max_length:
            budget //= 2
            out.append((f"max_tokens_per_batch={budget}", {"max_tokens_per_batch": budget}, 0))
    if config.optim in ("adamw_torch", "adamw_torch_fused"):
        out.append(("optim=paged_adamw_8bit", {"optim": "paged_adamw_8bit"}, 0))
    length = config.max_length
    for share in (0.75, 0.5):
        new = int(length * share)
        prompt = min(config.max_prompt_length, new // 2)
        out.append((f"max_length={new} max_prompt_length={prompt} (cuts longer pairs)", {"max_length": new, "max_prompt_length": prompt}, 0))
    if not config.model.load_in_4bit:
        extra = {} if config.lora.enabled else {"lora.enabled": True}
        out.append(("model.load_in_4bit=true" + ("" if config.lora.enabled else " lora.enabled=true (QLoRA)"),
                    {"model.load_in_4bit": True, **extra}, 0))
    for n in (2, 4, 8):
        out.append((f"{n} GPUs with FSDP2 (configs/accelerate/fsdp2-*.yaml)", {}, n))
    return out


def changes_that_fit(config, arch, lengths, new_tokens, gpu: Gpu, world: int, engine: str, limit: int = 3) -> list[dict]:
    """Single changes that make the job fit `gpu`, in candidate order (at most `limit`); when none alone does,
    the candidates applied one after another until it fits."""
    from ..config import make_config

    def trial(overrides: dict, gpus: int) -> float:
        changed = make_config(config, overrides) if overrides else config
        cut = lengths.cut(changed.max_length, changed.max_prompt_length)
        n = gpus or world
        mine = size(changed, arch, cut, new_tokens, "cuda", gpu, n, "fsdp2" if gpus else engine)[0]
        return total_gib(mine, "cuda")

    found = []
    candidates = candidate_changes(config)
    for text, overrides, gpus in candidates:
        try:
            peak_gib = trial(overrides, gpus)
        except ConfigError:
            continue
        if peak_gib <= gpu.memory_gib:
            found.append({"change": text, "peak_gib": round(peak_gib, 2)})
            if len(found) == limit:
                break
    if found:
        return found
    merged: dict = {}
    said = []
    for text, overrides, gpus in candidates:
        if gpus:
            break
        merged.update(overrides)
        said.append(text.split(" (")[0])
        try:
            peak_gib = trial(merged, 0)
        except ConfigError:
            continue
        if peak_gib <= gpu.memory_gib:
            return [{"change": " and ".join(said), "peak_gib": round(peak_gib, 2)}]
    return []


def plan_job(config: Config, gpus: list[str] | None = None, num_gpus: int = 1, engine: str = "ddp",
             read_data: bool = True) -> Plan:
    """The plan of `config` for each of `gpus` (names from training.gpus.GPUS, or "cpu"; default all GPUs) with
    `num_gpus` processes under `engine`. `read_data`: read the training pairs' real token lengths."""
    if engine not in ENGINES:
        raise PlanError(f"unknown engine '{engine}': one of {', '.join(ENGINES)}")
    if num_gpus < 1:
        raise PlanError(f"--gpus must be at least 1, got {num_gpus}")
    names = list(gpus) if gpus else list(GPUS)
    devices = []
    for name in names:
        if name.lower() == "cpu":
            devices.append(("CPU", "cpu", None))
            continue
        try:
            gpu = find_gpu(name)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        devices.append((gpu.name, "cuda", gpu))
    arch = read_arch(config)
    if read_data:
        lengths, new_tokens = read_lengths(config)
    else:
        lengths, new_tokens = worst_case(config, "every pair at max_length"), 0
    if not lengths.pairs:
        raise PlanError("no training pairs: nothing to plan")
    targets, first, work = [], None, None
    for label, device, gpu in devices:
        mine, theirs, notes, steps, setup = size(config, arch, lengths, new_tokens, device, gpu, num_gpus, engine)
        first = first or (steps, setup)
        total, trl_total = total_gib(mine, device), total_gib(theirs, device)
        target = Target(label, gpu.memory_gib if gpu else None, mine, theirs, total, trl_total,
                        None if gpu is None else total <= gpu.memory_gib, notes=notes)
        if gpu is not None:
            work = flops(arch, setup, steps) if work is None else work  # the same passes on every GPU
            target.step_seconds, target.efficiency = step_seconds(work, gpu, setup)
            target.run_hours = round(target.step_seconds * total_steps(config, len(lengths.pairs), num_gpus) / 3600, 2)
            if not target.fits:
                target.changes = changes_that_fit(config, arch, lengths, new_tokens, gpu, num_gpus, engine)
        targets.append(target)
    common = [n for n in targets[0].notes if all(n in t.notes for t in targets)]
    for t in targets:
        t.notes = [n for n in t.notes if n not in common]
    steps, setup = first
    tokens = [sum(sum(x) + x[0] for x in p.pairs) for s in steps for p in s]  # prompt+chosen and prompt+rejected
    trainable = sum(trainable_tensors(arch, setup))
    return Plan(
        model=config.model.name_or_path, arch=arch, params=arch.params, trainable=trainable, lengths_source=lengths.source,
        pairs=len(lengths.pairs), steps=total_steps(config, len(lengths.pairs), num_gpus),
        tokens_per_step=sum(tokens) / max(len(steps), 1), flops_per_step=flops(arch, setup, steps),
        passes_per_step=sum(len(s) for s in steps) / max(len(steps), 1), num_gpus=num_gpus, engine=engine, targets=targets,
        notes=common)


def total_steps(config: Config, pairs: int, world: int) -> int:
    """Optimizer steps of the run, as the loop counts them."""
    per_epoch = math.ceil(math.ceil(pairs / (config.per_device_train_batch_size * world)) / config.gradient_accumulation_steps)
    return config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * per_epoch)


PART_NAMES = {"runtime": "CUDA context / runtime", "weights": "weights", "lora": "LoRA weights", "gradients": "gradients",
              "optimizer": "optimizer states", "activations": "activations", "output_layer": "output layer",
              "transient": "largest transient", "heap": "CPU heap kept"}


def render(plan: Plan) -> str:
    """The plan as text: the job, peak by part per device (orpo and TRL), verdicts, time, changes that fit."""
    a = plan.arch
    lines = [f"model: {plan.model} ({a.model_type}, {plan.params / 1e9:.2f}B parameters, {a.layers} layers, hidden {a.hidden}, "
             f"vocabulary {a.vocab:,}); trained: {plan.trainable:,} parameters",
             f"data: {plan.lengths_source}; {plan.steps:,} steps of {plan.tokens_per_step:,.0f} tokens "
             f"({plan.passes_per_step:.1f} forward passes, {plan.flops_per_step / 1e12:.2f} TFLOP per step)",
             f"processes: {plan.num_gpus}" + (f" ({plan.engine})" if plan.num_gpus > 1 else ""), ""]
    parts = list(PART_NAMES)
    head = f"{'peak per device, GiB':<24}" + "".join(f"{t.name:>10}" for t in plan.targets)
    lines += [head, "-" * len(head)]
    for part in parts:
        if part == "heap" and all(t.memory_gib for t in plan.targets):
            continue
        lines.append(f"{PART_NAMES[part]:<24}" + "".join(f"{getattr(t.orpo, part) / GIB:>10.2f}" for t in plan.targets))
    if any(t.memory_gib for t in plan.targets):
        lines.append(f"{'allocator slack':<24}" + "".join(f"{(t.peak_gib - t.orpo.total / GIB):>10.2f}" for t in plan.targets))
    lines.append(f"{'orpo peak':<24}" + "".join(f"{t.peak_gib:>10.2f}" for t in plan.targets))
    lines.append(f"{'TRL ORPOTrainer peak':<24}" + "".join(f"{t.trl_peak_gib:>10.2f}" for t in plan.targets))
    gpus = [t for t in plan.targets if t.memory_gib]
    if gpus:
        lines.append(f"{'GPU memory':<24}" + "".join(f"{t.memory_gib:>10.1f}" if t.memory_gib else f"{'':>10}" for t in plan.targets))
        lines.append(f"{'s/step (estimate)':<24}" + "".join(f"{t.step_seconds:>10.2f}" if t.step_seconds else f"{'':>10}" for t in plan.targets))
        lines.append(f"{'run hours (estimate)':<24}" + "".join(f"{t.run_hours:>10.2f}" if t.run_hours is not None else f"{'':>10}" for t in plan.targets))
        lines.append("")
        for t in gpus:
            margin = t.memory_gib - t.peak_gib
            verdict = f"fits, {margin:.1f} GiB to spare" if t.fits else f"does not fit: {-margin:.1f} GiB over"
            trl = "fits" if t.trl_peak_gib <= t.memory_gib else "does not fit"
            lines.append(f"{t.name}: {verdict} (TRL: {t.trl_peak_gib:.1f} GiB, {trl})")
            for change in t.changes:
                lines.append(f"    fits with {change['change']}: {change['peak_gib']:.1f} GiB")
            if not t.fits and not t.changes:
                lines.append("    no single change or combination tried makes it fit")
            lines += [f"    note: {n}" for n in t.notes]
        lines.append(f"\ntimes: model FLOPs at {', '.join(f'{int(v * 100)}% ({k})' for k, v in EFFICIENCY.items())} of each GPU's "
                     f"dense peak: {EFFICIENCY_SOURCE}; evaluation not included. CUDA context {CUDA_CONTEXT_GIB} GiB and "
                     f"allocator slack {int(ALLOCATOR_SLACK * 100)}%: estimates.")
    else:
        lines += [f"    note: {n}" for t in plan.targets for n in t.notes]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def fit_check(config: Config, train_ds, new_tokens: int, device_name: str, free_bytes: int, world: int, engine: str) -> str:
    """Before the model loads on a CUDA GPU: the plan's peak for this run beside the device's free memory, as
    one line; ConfigError with that line and the changes that would fit when it does not fit (config.check_memory
    false: the line is returned with a warning instead)."""
    from .gpus import match_device

    arch = read_arch(config)
    pairs = pair_lengths(train_ds)
    lengths = Lengths(pairs, f"{len(pairs):,} training pairs")
    known = match_device(device_name)
    gpu = replace(known or Gpu(device_name, 0.0, 0.0, 0.0, True, "this device"), name=device_name, memory_gib=free_bytes / GIB)
    mine = size(config, arch, lengths, new_tokens, "cuda", gpu, world, engine)[0]
    need = total_gib(mine, "cuda")
    line = f"memory plan: peak {need:.1f} GiB per GPU (orpo plan), {gpu.memory_gib:.1f} GiB free on {device_name}"
    if need <= gpu.memory_gib:
        return line + ": fits"
    changes = changes_that_fit(config, arch, lengths, new_tokens, gpu, world, engine)
    advice = "; ".join(f"{c['change']} ({c['peak_gib']:.1f} GiB)" for c in changes) or "none of the changes orpo plan tries"
    text = f"{line}: does not fit ({need - gpu.memory_gib:.1f} GiB over). Changes that fit: {advice}"
    if config.check_memory:
        raise ConfigError(text + ". check_memory=false starts anyway (the plan is an estimate)")
    return text + " (check_memory=false: starting anyway)"


def predict(config: Config, pairs: list[tuple[int, int, int]], device_name: str | None = None) -> dict[str, dict]:
    """The plan's figures for `config` trained on `pairs` ((prompt, chosen, rejected) token counts), for a benchmark
    to print beside what it measured: {"orpo": ..., "trl": ...}, each with the peak (GiB: the process's RSS on the
    CPU; on a GPU with the CUDA context and allocator slack), the tensors alone (what torch.cuda.max_memory_allocated
    counts) and, on a GPU the table knows, the step time at the estimated efficiency. `device_name`: a CUDA
    device's name, None for the CPU."""
    from .gpus import match_device

    arch = read_arch(config)
    device, gpu = ("cpu", None) if device_name is None else ("cuda", match_device(device_name))
    mine, theirs, _, steps, setup = size(config, arch, Lengths(pairs, "given"), 0, device, gpu, 1, "ddp")
    out = {}
    for name, parts, code in (("orpo", mine, setup), ("trl", theirs, replace(setup, code="stock", layout="plain"))):
        figures = {"peak_gib": round(total_gib(parts, device), 3), "tensors_gib": round((parts.total - parts.runtime) / GIB, 3)}
        if gpu is not None:
            work = flops(arch, code, steps if name == "orpo" else lay_out(config, Lengths(pairs, ""), device, code.kernel, 1, trl=True))
            seconds, efficiency = step_seconds(work, gpu, setup)
            figures |= {"s_per_step": seconds, "efficiency": efficiency, "gpu": gpu.name}
        out[name] = figures
    return out
