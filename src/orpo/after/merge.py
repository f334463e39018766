"""`orpo merge`: fold a run's LoRA adapter into its base weights and save a plain 16-bit model, then check it.

The base is loaded in fp32, even for QLoRA runs (merging into 4-bit weights would re-quantize the sum), peft's
`merge_and_unload` adds B·A·scale to each target weight and writes the trained ChatML rows
(`trainable_token_indices`, see model.new_token_rows) into the embedding and output matrices, and only then is
the model cast to the chosen dtype: each weight is rounded once (merging in bf16 would round the base and then
the sum). This needs 4 bytes of memory per parameter (32 GB for an 8B model).

Check: the saved model, reloaded from disk, is compared with the unmerged adapter model in fp32 on a few
chat prompts. Both run in fp32, so the difference measures the merge and the rounding of the merged weights
to the chosen dtype. The tolerance is relative to the largest logit: 4 units of the dtype's rounding
(torch.finfo(dtype).eps: bf16 2^-7, fp16 2^-10), and at least 1e-5 (in fp32 the merged and unmerged models
add the same terms in another order).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..data.pairs import end_of_turn_id
from .card import write_card
from .runs import MERGED_CONFIG, load, prompt_logits, resolve

log = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Max |logit difference| allowed, as a share of the largest |logit|: 4 units of the dtype's rounding, >= 1e-5.
TOLERANCE = {name: max(4 * torch.finfo(getattr(torch, dtype)).eps, 1e-5) for name, dtype in DTYPES.items()}
PROMPTS = [
    "What is 12 + 7? Reply with only the number.",
    "Write one sentence about the sea.",
    "Which number is larger, 736 or 551? Reply with only the number.",
]


@dataclass
class MergeCheck:
    max_abs_diff: float
    scale: float  # largest |logit| of the reference
    tolerance: float  # allowed max_abs_diff = TOLERANCE[dtype] * scale
    top1_agreement: float  # share of positions whose argmax token agrees
    adapter_effect: float | None  # max |logit change| the adapter makes on the base: what a lost merge would show

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def merge_run(run_dir: str | Path, dtype: Literal["bf16", "fp16", "fp32"], out: str | Path, max_shard_size: str = "2GB",
              overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Merged model + tokenizer + chat template + generation_config (eos = end of turn) + the run's config."""
    run_dir, out = Path(run_dir), Path(out)
    target = resolve(str(run_dir), overrides)
    if target.kind != "run":
        raise ValueError(f"{run_dir} is not a run folder (config.yaml + final/)")
    model, tokenizer = merged_model(target)
    model = model.to(getattr(torch, DTYPES[dtype]))  # one rounding per weight
    eot = end_of_turn_id(tokenizer)
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = eot
    model.config.name_or_path = str(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    shutil.copy(run_dir / "config.yaml", out / MERGED_CONFIG)
    return out


def merged_model(target):
    """(fp32 model with the run's adapter folded in, tokenizer); a merged folder or full run as it is."""
    model, tokenizer = load(target, dtype="float32", quantized=False)
    if target.is_adapter:
        model = model.merge_and_unload()  # in fp32
    return model, tokenizer


def check_merge(run_dir: str | Path, merged_dir: str | Path, dtype: str, prompts: list[str] = PROMPTS,
                overrides: list[str] | tuple[str, ...] = ()) -> MergeCheck:
    """Logits of the reloaded merged model vs the unmerged adapter model (both computed in fp32)."""
    from transformers import AutoModelForCausalLM

    target = resolve(str(run_dir), overrides)
    reference, tokenizer = load(target, dtype="float32", quantized=False)
    want = prompt_logits(reference, tokenizer, prompts)
    effect = None
    if hasattr(reference, "disable_adapter"):
        with reference.disable_adapter():
            base = prompt_logits(reference, tokenizer, prompts)
        effect = max(float((a - b).abs().max()) for a, b in zip(want, base, strict=True))
    del reference
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, trust_remote_code=target.config.model.trust_remote_code).eval()
    got = prompt_logits(merged, tokenizer, prompts)
    diff = max(float((a - b).abs().max()) for a, b in zip(want, got, strict=True))
    scale = max(float(a.abs().max()) for a in want)
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(want, got, strict=True)]).mean()
    return MergeCheck(diff, scale, TOLERANCE[dtype] * scale, float(agree), effect)


def merge_and_check(run_dir: str, dtype: str, out: str, max_shard_size: str = "2GB",
                    overrides: list[str] | tuple[str, ...] = ()) -> tuple[Path, MergeCheck]:
    """merge_run, then check_merge; the check goes to OUT/orpo_merge.json, the model card to OUT/README.md."""
    path = merge_run(run_dir, dtype, out, max_shard_size, overrides)
    check = check_merge(run_dir, path, dtype, overrides=overrides)
    (path / "orpo_merge.json").write_text(json.dumps({"run_dir": str(Path(run_dir).resolve()), "dtype": dtype, **check.__dict__, "passed": check.passed}, indent=2))
    write_card(path)  # README.md: the model card `orpo push` uploads
    return path, check


def check_text(dtype: str, check: MergeCheck) -> str:
    """The check in words, as `orpo merge` prints it."""
    verdict = "PASS" if check.passed else "FAIL"
    text = (f"logit check vs the adapter model on {len(PROMPTS)} prompts: max |diff| = {check.max_abs_diff:.3e} "
            f"(tolerance {check.tolerance:.3e} = {TOLERANCE[dtype]:g} x max |logit| {check.scale:.2f}), "
            f"top-1 agreement {100 * check.top1_agreement:.1f}%: {verdict}")
    if check.adapter_effect is not None:
        text += f"\n(for scale: the adapter itself moves the base model's logits by up to {check.adapter_effect:.3e})"
    return text


def merged_text(path: Path, dtype: str, check: MergeCheck) -> str:
    """What `orpo merge` prints: the folder, its files and the check."""
    files = ", ".join(sorted(p.name for p in path.iterdir()))
    return f"merged model ({dtype}) saved to {path}: {files}\n{check_text(dtype, check)}"


def run_merge(run_dir: str, dtype: str, out: str, max_shard_size: str = "2GB", overrides: list[str] | tuple[str, ...] = ()) -> int:
    """Merge and check, printing what `orpo merge` prints; 1 when the check fails (orpo serve's merge step)."""
    path, check = merge_and_check(run_dir, dtype, out, max_shard_size, overrides)
    print(merged_text(path, dtype, check))
    return 0 if check.passed else 1
