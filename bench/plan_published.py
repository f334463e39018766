"""orpo plan's memory model against published GPU figures for the same jobs (not tests: a check on the model).

    .venv/bin/python bench/plan_published.py [--out bench/results/plan-published.md]

Three sources, each job sized with training/memory.py's parts (the same counts `orpo plan` uses), with the
settings the source states and, where it does not, the assumption written in the row:
1. Maxime Labonne, "Fine-tune Llama 3 with ORPO" (2024-04-19): TRL's ORPOTrainer, Llama 3 8B QLoRA (NF4, double
   quantization), LoRA r16 on all linear layers, batch 2, max_length 1,024, paged 8-bit AdamW, on an L4: "~20 GB".
2. Unsloth's context-length table (README, 2025-01-14; docs.unsloth.ai/basics/unsloth-benchmarks): Llama 3.1 8B
   Instruct QLoRA r32 on all linear layers, batch 1, Hugging Face + FlashAttention 2: the longest sequence that
   trains on 8-80 GB. Supervised fine-tuning (one sequence, no pair): the model's own loss on full logits.
3. LitGPT's config hub (config_hub/finetune/README.md, 2024): Llama 3 8B on an A10G, bf16-true, LoRA r32 on query
   and value, max_seq_length 512, no activation checkpointing; peak = torch.cuda.max_memory_allocated() / 1e9.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from orpo.training.gpus import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB
from orpo.training.memory import (
    GIB,
    Arch,
    Pass,
    Setup,
    layer_bytes,
    mask_bytes,
    optimizer_bytes,
    peak,
    trainable_tensors,
    weight_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = Arch("llama", 32, 4096, 14336, 32, 8, 128, 128_256, False)
QLORA = Setup(lora=True, r=16, weight_bytes=2, load_in_4bit=True, double_quant=True, residual_bytes=4, linear_bytes=2,
              gradient_checkpointing=True, optim="paged_adamw_8bit", layout="plain", kernel="flash_attention_2", code="stock")


def on_gpu(parts_total: int, runtime: int) -> float:
    """GiB a GPU must hold: the CUDA context and the allocator's slack on top of the tensors (as orpo plan)."""
    return (runtime + (parts_total - runtime) * (1 + ALLOCATOR_SLACK)) / GIB


def tutorial() -> dict:
    """TRL's ORPOTrainer as the tutorial ran it, every pair at max_length (prompt 512, responses 512)."""
    setup = QLORA
    passes = [[Pass(4, 1024, ((512, 512, 512),) * 2, packed=False, padded=False)] for _ in range(4)]
    parts = peak(LLAMA3_8B, setup, passes, int(CUDA_CONTEXT_GIB * GIB))
    return {"source": "Labonne, Fine-tune Llama 3 with ORPO (TRL ORPOTrainer, L4)", "published": "~20 GB (\"as much VRAM as available\")",
            "published_gib": 20e9 / GIB, "predicted_gib": on_gpu(parts.total, parts.runtime),
            "settings": "Llama 3 8B, NF4 + double quant, r16 all linear, batch 2, max_length 1,024 (every pair full), GC on "
                        "(peft's prepare_model_for_kbit_training), flash_attention_2, paged 8-bit AdamW",
            "parts": {k: round(v / GIB, 2) for k, v in parts.as_dict().items()}}


def sft_total(arch: Arch, setup: Setup, tokens: int, runtime: int, chunked_loss: bool = False) -> int:
    """Bytes of one supervised step on one sequence of `tokens`: weights, LoRA and its optimizer, the layers'
    activations (checkpointed or not) and the loss on full logits: the logits (linear dtype, kept in the model's
    output) and their fp32 log-softmax (kept for the backward), plus at the backward's start the fp32 gradients of
    the log-softmax's output and input (transformers' loss); LitGPT's chunked cross-entropy builds those a chunk
    at a time (not counted)."""
    p = Pass(1, tokens, ((0, tokens, 0),), packed=False, padded=False)
    sizes = trainable_tensors(arch, setup)
    weights = weight_bytes(arch, setup)[0]
    lora = sum(sizes) * 4
    optimizer = optimizer_bytes(sizes, 4, setup.optim)
    layer = layer_bytes(arch, setup, p)
    acts = (arch.layers + 1) * tokens * arch.hidden * setup.residual_bytes + layer if setup.gradient_checkpointing else arch.layers * layer
    cells = tokens * arch.vocab
    loss = cells * setup.linear_bytes + cells * 4 + (0 if chunked_loss else 2 * cells * 4)
    return runtime + weights + 2 * lora + optimizer + acts + loss + mask_bytes(setup, p)


def unsloth() -> list[dict]:
    """Hugging Face + FA2's longest trainable sequence per GPU size, Llama 3.1 8B QLoRA r32, batch 1."""
    setup = replace(QLORA, r=32, optim="adamw_8bit")  # optimizer not stated: Unsloth's notebooks use adamw_8bit
    published = {8: None, 12: 932, 16: 2551, 24: 5789, 40: 12264, 48: 15502, 80: 28454}
    rows = []
    for gb, tokens in published.items():
        capacity = gb * 1e9 / GIB * 0.98  # what torch sees of a card sold as `gb` GB, about
        runtime = int(CUDA_CONTEXT_GIB * GIB)
        lo, hi = 0, 1 << 20
        while lo < hi:  # the longest sequence whose step fits
            mid = (lo + hi + 1) // 2
            fits = on_gpu(sft_total(LLAMA3_8B, setup, mid, runtime), runtime) <= capacity
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        rows.append({"gpu_gb": gb, "published": tokens, "predicted": lo if lo >= 16 else None})
    return rows


def litgpt() -> list[dict]:
    """LitGPT's A10G rows for Llama 3 8B: max_memory_allocated (tensors only: no context, no slack), bf16-true."""
    out = []
    base = Setup(lora=True, r=32, targets=("q_proj", "v_proj"), weight_bytes=2, residual_bytes=2, linear_bytes=2,
                 gradient_checkpointing=False, optim="adamw_torch", layout="plain", kernel="sdpa", code="stock", dropout=0.05)
    for name, setup, batch, published in (
        ("LoRA, micro batch 1", base, 1, 19.73),
        ("QLoRA nf4 (no double quant), micro batch 2", replace(base, load_in_4bit=True, double_quant=False), 2, 17.41)):
        tokens = 512 * batch
        total = sft_total(LLAMA3_8B, setup, tokens, 0, chunked_loss=True)
        if setup.load_in_4bit:  # LitGPT keeps the embeddings and output layer in bf16 (no fp32 upcast as peft's)
            rest = LLAMA3_8B.params - LLAMA3_8B.layers * LLAMA3_8B.layer_linear_params()
            total -= rest * 2
        total -= sum(trainable_tensors(LLAMA3_8B, setup)) * 2  # bf16-true: LoRA, gradients and states in bf16
        out.append({"job": name, "published_gb": published, "predicted_gb": round(total / 1e9, 2)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan-published.md"))
    a = ap.parse_args()
    t, u, lit = tutorial(), unsloth(), litgpt()
    lines = ["# orpo plan's memory model against published GPU figures", "",
             "`python bench/plan_published.py`: each job sized with training/memory.py (what `orpo plan` uses). Not "
             "tests; a miss over 25% is explained in the README (Will it fit?).", "",
             "| source | settings | published | predicted | difference |", "|---|---|---|---|---|",
             f"| {t['source']} | {t['settings']} | {t['published']} | {t['predicted_gib']:.1f} GiB ({t['predicted_gib'] * GIB / 1e9:.1f} GB) "
             f"| {100 * (t['predicted_gib'] / t['published_gib'] - 1):+.0f}% |"]
    for r in lit:
        lines.append(f"| LitGPT config hub, A10G, Llama 3 8B | {r['job']}, max_seq_length 512, r32 on q and v, bf16-true, no "
                     f"checkpointing | {r['published_gb']:.2f} GB | {r['predicted_gb']:.2f} GB | {100 * (r['predicted_gb'] / r['published_gb'] - 1):+.0f}% |")
    lines += ["", "Unsloth's table, Hugging Face + FA2 column: the longest sequence Llama 3.1 8B QLoRA (r32, all linear, batch 1) "
              "trains on each GPU size; predicted with gradient checkpointing on (peft's default), 8-bit AdamW, the model's own loss "
              "on full logits.", "", "| GPU | published (tokens) | predicted | difference |", "|---|---|---|---|"]
    for r in u:
        pub = f"{r['published']:,}" if r["published"] else "OOM"
        pred = f"{r['predicted']:,}" if r["predicted"] else "OOM"
        diff = f"{100 * (r['predicted'] / r['published'] - 1):+.0f}%" if r["published"] and r["predicted"] else ("agrees" if not r["published"] and not r["predicted"] else "-")
        lines.append(f"| {r['gpu_gb']} GB | {pub} | {pred} | {diff} |")
    out = Path(a.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"tutorial": t, "unsloth": u, "litgpt": lit}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
