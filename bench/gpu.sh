#!/usr/bin/env bash
# The training benchmark on a CUDA GPU: orpo (packed), orpo (plain) and TRL 1.16's ORPOTrainer on
#   gpu_8b_qlora  a Llama-3-8B-shaped model (random init in the real dimensions: nothing is downloaded), QLoRA NF4,
#                 bf16, gradient checkpointing, paged 8-bit AdamW, 2 pairs x GA 4, max_length 1,024,
#                 orpo-dpo-mix-like lengths (prompts 32-512, responses 32-640 tokens)
#   gpu_1b_lora   a Llama-3.2-1B-shaped model, LoRA, bf16, same batch and lengths
# reporting s/step, pairs/s, peak GPU memory and MFU against the card's dense bf16 peak (BENCH_PEAK_TFLOPS
# overrides it). Writes bench/results/gpu.json and gpu.md.   Usage: bench/gpu.sh [more bench_train.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')"
exec "$PY" bench/bench_train.py --scenarios gpu_1b_lora,gpu_8b_qlora --steps 5 --warmup 2 --rounds 1 \
  --out bench/results/gpu "$@"
