"""What `orpo eval/merge/chat/push` point at: a run folder, a merged model, or a base model; and loading it.

    run folder    OUTPUT_DIR of `orpo train`: config.yaml + final/ (a LoRA adapter or a full model)
    merged model  the output of `orpo merge`: a plain model folder holding orpo_config.yaml (the run's config)
    base model    'builtin', a Hub id or any local model folder

Every target resolves to a Config that rebuilds the run's tokenizer and held-out split exactly
(`data.pairs.load_pairs(config, tokenizer)`), plus the weights to put on top of it.

A folder's own config never turns on `model.trust_remote_code` (a folder someone sends you must not run code):
only the user's command line does (`--trust-remote-code`, or the override `model.trust_remote_code=true`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..config import Config, load_config
from ..data.pairs import prompt_ids
from ..hub_errors import hub_errors
from ..model.load import DTYPES, load_base, load_tokenizer, loading_bars, looks_local, weights_dtype

MERGED_CONFIG = "orpo_config.yaml"  # the run's config, copied into a merged model folder
REMOTE_CODE = "model.trust_remote_code"

log = logging.getLogger(__name__)


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


def is_run(folder: Path) -> bool:
    """A run folder as `orpo train` leaves it: config.yaml and final/."""
    return (folder / "config.yaml").is_file() and (folder / "final").is_dir()


def with_model(config: Config, name_or_path: str, revision: str | None = None) -> Config:
    """`config` with its model swapped for a plain (no LoRA, not 4-bit) one at `name_or_path` (at `revision`)."""
    model = config.model.model_copy(update={"name_or_path": name_or_path, "gguf_file": None, "revision": revision, "load_in_4bit": False})
    return config.model_copy(update={"model": model, "lora": config.lora.model_copy(update={"enabled": False})})


def resolve(spec: str, overrides: list[str] | tuple[str, ...] = (), like: Config | None = None) -> Target:
    """Work out what `spec` is. A base model takes its data/eval settings from `like` (the other side of a
    comparison) when given, else from the defaults; `overrides` (key=value) apply on top."""
    path = Path(spec).expanduser()
    if path.is_file():
        hint = f" (the run folder is {path.parent})" if path.name in ("config.yaml", MERGED_CONFIG, "summary.json") else ""
        raise FileNotFoundError(f"{spec} is a file: give a run folder, a merged or other model folder, 'builtin' or a Hub id{hint}")
    if not path.exists() and looks_local(spec):
        raise FileNotFoundError(f"{spec}: no such folder")
    if is_run(path):
        return Target(spec, "run", own_flag_only(load_config(path / "config.yaml", overrides), overrides, spec))
    if (path / MERGED_CONFIG).is_file():
        config = own_flag_only(load_config(path / MERGED_CONFIG, overrides), overrides, spec)
        return Target(spec, "merged", with_model(config, spec))
    if path.is_dir() and (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{spec} has a config.yaml but no final/ model: did the run finish?")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{spec} is not a model folder (no config.json), a run folder (config.yaml + final/) or a merged model")
    base = like if like is not None and not overrides else load_config(None, overrides)
    asked = any(item.split("=", 1)[0].strip() == "model.revision" for item in overrides)  # not the other side's
    return Target(spec, "base", with_model(base, spec, base.model.revision if asked else None))


def own_flag_only(config: Config, overrides, spec: str) -> Config:
    """`config` (read from a folder) with trust_remote_code off unless the command line itself turned it on."""
    asked = any(item.split("=", 1)[0].strip() == REMOTE_CODE for item in overrides)
    if not config.model.trust_remote_code or asked:
        return config
    log.warning("%s: its config sets %s; not honoured from a folder (pass --trust-remote-code to run its model code)", spec, REMOTE_CODE)
    return config.model_copy(update={"model": config.model.model_copy(update={"trust_remote_code": False})})


def needs_remote_code(spec: str) -> ValueError:
    """transformers' refusal to run a model's own code, as one line saying how to allow it."""
    return ValueError(f"{spec}: this model needs its own Python code to load; if you trust it, add --trust-remote-code")


def load(target: Target, dtype: str | None = None, quantized: bool = True):
    """(model, tokenizer) in eval mode. `dtype` (float32/bfloat16/float16) overrides the run's weights dtype;
    `quantized=False` loads a QLoRA run's base in 16-bit/32-bit instead of 4-bit (what merging needs)."""
    from transformers import AutoModelForCausalLM

    config = target.config
    trust = config.model.trust_remote_code
    try:
        tokenizer, new_ids = load_tokenizer(config)
        torch_dtype = DTYPES[dtype] if dtype else weights_dtype(config)
        if target.kind == "run" and not target.is_adapter:  # full fine-tuning: final/ is the whole model
            loading_bars()
            with hub_errors(str(target.final_dir)):  # local, but its remote code (auto_map) may name a Hub repo
                model = AutoModelForCausalLM.from_pretrained(target.final_dir, dtype=torch_dtype, trust_remote_code=trust)
            return _ready(model, tokenizer), tokenizer
        model = load_base(config, tokenizer, new_ids, dtype=torch_dtype, quantized=quantized)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust:
            raise needs_remote_code(target.spec) from None
        raise
    if target.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, target.final_dir)
    return _ready(model, tokenizer), tokenizer


def merged_model(target: Target):
    """(fp32 model with the run's adapter folded in by peft, tokenizer); a merged folder or full run as it is.
    The whole model in memory: what after.weights falls back to when it cannot stream (it lives here, not in
    after.merge, since merge imports weights)."""
    model, tokenizer = load(target, dtype="float32", quantized=False)
    if target.is_adapter:
        model = model.merge_and_unload()  # in fp32
    return model, tokenizer


def _ready(model, tokenizer):
    """Pad and end-of-turn ids set as in training; eval mode."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """fp32 logits (T, V) of each chat prompt (a user message) with the generation header, one at a time,
    from the ids training would use (data.pairs.prompt_ids)."""
    out = []
    for ids in prompt_ids(tokenizer, [[{"role": "user", "content": text}] for text in prompts]):
        out.append(model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float())  # (T, V)
    return out
