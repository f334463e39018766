"""The GPUs `orpo plan` sizes a job for: memory, peak throughput, and where each figure comes from.

Memory is what torch reports as the card's total (GiB), a little under the marketed GB. Peak FLOP/s are the
dense tensor-core figures of the datasheets (no sparsity) in the dtype the run computes in: bf16, or fp16 on
the T4, which has no bf16. The efficiency (the share of peak a training step reaches) is an estimate until
the GPU check (bench/gpu/) measures it on a card; `EFFICIENCY_SOURCE` says which it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # total as torch.cuda reports it
    tflops: float  # dense bf16 (fp16 where there is no bf16) tensor-core peak
    bandwidth_tbs: float
    bf16: bool
    source: str


GPUS = {
    "H100": Gpu("H100", 79.1, 989.0, 3.35, True, "NVIDIA H100 SXM datasheet: 80 GB HBM3, 989 TFLOPS bf16 dense"),
    "H200": Gpu("H200", 139.8, 989.0, 4.8, True, "NVIDIA H200 SXM datasheet: 141 GB HBM3e, 989 TFLOPS bf16 dense"),
    "A100-80": Gpu("A100-80", 79.1, 312.0, 2.04, True, "NVIDIA A100 datasheet: 80 GB HBM2e, 312 TFLOPS bf16 dense"),
    "A100-40": Gpu("A100-40", 39.4, 312.0, 1.56, True, "NVIDIA A100 datasheet: 40 GB HBM2, 312 TFLOPS bf16 dense"),
    "L4": Gpu("L4", 22.0, 121.0, 0.3, True, "NVIDIA L4 datasheet: 24 GB GDDR6, 242 TFLOPS bf16 with sparsity (121 dense)"),
    "T4": Gpu("T4", 14.6, 65.0, 0.32, False, "NVIDIA T4 datasheet: 16 GB GDDR6, 65 TFLOPS fp16 (no bf16)"),
    "RTX4090": Gpu("RTX4090", 23.5, 165.2, 1.01, True, "NVIDIA Ada whitepaper: 24 GB GDDR6X, 165 TFLOPS bf16 dense (fp32 accumulate)"),
}
ALIASES = {"A100": "A100-80", "A100-80GB": "A100-80", "A100-40GB": "A100-40", "4090": "RTX4090", "RTX-4090": "RTX4090",
           "H100-80": "H100", "H200-141": "H200"}

# Share of peak FLOP/s a training step reaches. Estimates, not measurements: no GPU check has run yet.
EFFICIENCY = {"16-bit": 0.40, "4-bit": 0.25}
EFFICIENCY_SOURCE = "estimate (not yet measured by the GPU check, bench/gpu/)"
CUDA_CONTEXT_GIB = 0.6  # torch's CUDA context and library handles: estimate, measured by the GPU check
ALLOCATOR_SLACK = 0.08  # the caching allocator's reserved-but-unused share of the peak: estimate


def find_gpu(name: str) -> Gpu:
    """The table's GPU for `name` (case and dashes ignored); ValueError listing the known names otherwise."""
    key = name.strip().upper().replace("_", "-").replace(" ", "")
    for known in GPUS:
        if key == known.upper():
            return GPUS[known]
    for alias, known in ALIASES.items():
        if key == alias.upper():
            return GPUS[known]
    raise ValueError(f"unknown GPU '{name}': known GPUs are {', '.join(GPUS)}")


def match_device(device_name: str) -> Gpu | None:
    """The table's entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3' (None when not listed)."""
    upper = device_name.upper()
    if "A100" in upper:
        return GPUS["A100-40" if "40G" in upper else "A100-80"]
    for key in ("H200", "H100", "L4", "T4"):
        if key in upper.split() or f" {key}" in upper or upper.startswith(key):
            return GPUS[key]
    return GPUS["RTX4090"] if "4090" in upper else None
