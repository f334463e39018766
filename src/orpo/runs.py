"""What `orpo eval/merge/chat/push` point at: a run folder, a merged model, or a base model; and loading it.

    run folder    OUTPUT_DIR of `orpo train`: config.yaml + final/ (a LoRA adapter or a full model)
    merged model  the output of `orpo merge`: a plain model folder holding orpo_config.yaml (the run's config)
    base model    'builtin', a Hub id or any local model folder

Every target resolves to a Config that rebuilds the run's tokenizer and held-out split exactly
(`data.load_pairs(config, tokenizer)`), plus the weights to put on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .config import Config, load_config
from .model import DTYPES, load_base, load_tokenizer, weights_dtype

MERGED_CONFIG = "orpo_config.yaml"  # the run's config, copied into a merged model folder


@dataclass
class Target:
    """A model to evaluate or chat with. `config` describes the run (or the defaults for a base model)."""

    spec: str  # what the user typed
    kind: Literal["run", "merged", "base"]
    config: Config

    @property
    def final_dir(self) -> Path:
        return Path(self.spec) / "final"

    @property
    def is_adapter(self) -> bool:
        return self.kind == "run" and (self.final_dir / "adapter_config.json").is_file()


def with_model(config: Config, name_or_path: str) -> Config:
    """`config` with its model swapped for a plain (no LoRA, not 4-bit) one at `name_or_path`."""
    model = config.model.model_copy(update={"name_or_path": name_or_path, "gguf_file": None, "revision": None, "load_in_4bit": False})
    return config.model_copy(update={"model": model, "lora": config.lora.model_copy(update={"enabled": False})})


def resolve(spec: str, overrides: list[str] | tuple[str, ...] = (), like: Config | None = None) -> Target:
    """Work out what `spec` is. A base model takes its data/eval settings from `like` (the other side of a
    comparison) when given, else from the defaults; `overrides` (key=value) apply on top."""
    path = Path(spec)
    if (path / "config.yaml").is_file() and (path / "final").is_dir():
        return Target(spec, "run", load_config(path / "config.yaml", overrides))
    if (path / MERGED_CONFIG).is_file():
        return Target(spec, "merged", with_model(load_config(path / MERGED_CONFIG, overrides), spec))
    if path.is_dir() and (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{spec} has a config.yaml but no final/ model: did the run finish?")
    base = like if like is not None and not overrides else load_config(None, overrides)
    return Target(spec, "base", with_model(base, spec))


def load(target: Target, dtype: str | None = None, quantized: bool = True):
    """(model, tokenizer) in eval mode. `dtype` (float32/bfloat16/float16) overrides the run's weights dtype;
    `quantized=False` loads a QLoRA run's base in 16-bit/32-bit instead of 4-bit (what merging needs)."""
    from transformers import AutoModelForCausalLM

    config = target.config
    tokenizer, new_ids = load_tokenizer(config)
    torch_dtype = DTYPES[dtype] if dtype else weights_dtype(config)
    if target.kind == "run" and not target.is_adapter:  # full fine-tuning: final/ is the whole model
        model = AutoModelForCausalLM.from_pretrained(target.final_dir, dtype=torch_dtype)
        return _ready(model, tokenizer), tokenizer
    model = load_base(config, tokenizer, new_ids, dtype=torch_dtype, quantized=quantized)
    if target.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, target.final_dir)
    return _ready(model, tokenizer), tokenizer


def _ready(model, tokenizer):
    """Pad and end-of-turn ids set as in training; eval mode."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """fp32 logits (T, V) of each chat prompt (a user message) with the generation header, one at a time."""
    out = []
    for text in prompts:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out.append(model(**enc).logits[0].float())  # (T, V)
    return out
