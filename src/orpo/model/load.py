"""Load the model and tokenizer, set up the chat template, attach LoRA (or QLoRA), save the result."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..config import BUILTIN, Config
from ..files import atomic_folder
from ..hub_errors import hub_errors
from .builtin import builtin_model_dir
from .chat_format import chatml, resize_embeddings
from .fast.gated_mlp import fuse_gated_mlps
from .fast.lora_dropout import fuse_lora_dropout
from .fast.lora_linear import fuse_lora_linears
from .fast.rms_norm import fuse_rms_norms

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights_dtype(config: Config) -> torch.dtype:
    if config.model.dtype != "auto":
        return DTYPES[config.model.dtype]
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    return torch.float32


def looks_local(name: str) -> bool:
    """A name that can only be a path (a Hub id is `name` or `owner/name`): never sent to the Hub."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def model_source(config: Config) -> tuple[str, dict]:
    """Where to load from, and the loading kwargs shared by model and tokenizer."""
    if config.model.name_or_path == BUILTIN:
        return str(builtin_model_dir()), {}
    name = config.model.name_or_path
    local = Path(name).expanduser()
    if not local.exists() and looks_local(name):
        raise FileNotFoundError(f"model.name_or_path={name}: no such folder")
    if local.is_file():
        raise FileNotFoundError(f"model.name_or_path={name} is a file: give its folder (and model.gguf_file for a GGUF file)")
    if local.is_dir() and not (local / "config.json").is_file() and not config.model.gguf_file:
        raise FileNotFoundError(f"model.name_or_path={name} is not a model folder (no config.json)")
    kwargs = {"trust_remote_code": config.model.trust_remote_code}
    if config.model.revision:
        kwargs["revision"] = config.model.revision
    if config.model.gguf_file:
        kwargs["gguf_file"] = config.model.gguf_file
    return config.model.name_or_path, kwargs


def load_tokenizer(config: Config):
    """The tokenizer, with a pad token, and ChatML set up when asked or when it has no template.

    Returns (tokenizer, new_token_ids): ids of tokens added for ChatML, whose embedding rows must train.
    """
    from transformers import AutoTokenizer

    source, kwargs = model_source(config)
    with hub_errors(source, revision=config.model.revision):
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    mode = config.model.chat_template
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "own" and not has_template:
        raise ValueError(f"model.chat_template=own but {config.model.name_or_path} has no chat template; use auto or chatml")
    new_ids = chatml(tokenizer) if mode == "chatml" or not has_template else []
    return ready_tokenizer(tokenizer), new_ids


def ready_tokenizer(tokenizer):
    """`tokenizer` with a pad token (its end of sequence when it has none) and right padding, as training needs."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def loading_bars() -> None:
    """transformers' weight-loading bars and notices only with -v (orpo's own bars stay)."""
    from transformers.utils import logging as hf_logging

    if logging.getLogger("orpo").isEnabledFor(logging.DEBUG):
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def load_base(config: Config, tokenizer, new_token_ids: list[int], dtype: torch.dtype | None = None, quantized: bool = True):
    """The base model as the config describes it (4-bit when model.load_in_4bit and `quantized`), with room
    for the tokenizer's tokens and the pad/end-of-turn ids set; `dtype` overrides the weights dtype."""
    from transformers import AutoModelForCausalLM

    source, kwargs = model_source(config)
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = config.model.attn_implementation
    if quantized and config.model.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.model.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=config.model.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=DTYPES[config.model.bnb_4bit_compute_dtype],
            bnb_4bit_quant_storage=DTYPES.get(config.model.bnb_4bit_quant_storage, torch.uint8),
        )
    loading_bars()
    with hub_errors(source, revision=config.model.revision):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or weights_dtype(config), **kwargs)
    if config.model.gguf_file:
        forget_gguf(model)
    if new_token_ids or model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        resize_embeddings(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def forget_gguf(model) -> None:
    """A model loaded from a GGUF file is dequantized to plain weights, yet transformers keeps it marked as
    GGUF-quantized and refuses to save it (a merge, or final/ of full fine-tuning): the mark goes, the weights stay."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(config: Config, tokenizer, new_token_ids: list[int], fuse: bool = True):
    """Base model (fp32/16-bit or 4-bit NF4), embeddings resized for new tokens, LoRA attached if enabled.
    `fuse`: swap in orpo's fused layers (the same numbers, less memory and time; off under ZeRO-3)."""
    return prepare_model(load_base(config, tokenizer, new_token_ids), config, new_token_ids, fuse)


def prepare_model(model, config: Config, new_token_ids: list[int], fuse: bool = True, lora=None):
    """A loaded model made ready to train as `config` says: orpo's fused layers (`fuse`), 4-bit training set-up,
    gradient checkpointing, and LoRA (`lora`: a peft LoraConfig to use instead of config.lora's; a model that is
    already a peft model keeps its adapters). Logs one line of what was fused."""
    peft_model = hasattr(model, "peft_config")
    base = model.get_base_model() if peft_model else model
    fused = {"gated MLPs": fuse_gated_mlps(base), "RMSNorms": fuse_rms_norms(base)} if fuse else {}
    keep_4bit_layout(base)
    if getattr(base, "is_loaded_in_4bit", False) and not peft_model:
        from peft import prepare_model_for_kbit_training

        # use_reentrant stated: torch warns without it (a future torch raises), and the non-reentrant form needs
        # no input-embedding gradient hook
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.gradient_checkpointing:
        base.config.use_cache = False
    if config.lora.enabled and not peft_model:
        from peft import LoraConfig, get_peft_model

        rows = new_token_rows(model, new_token_ids) or None
        if lora is None:
            lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                              target_modules=config.lora.target_modules, task_type="CAUSAL_LM", trainable_token_indices=rows)
        elif rows and not lora.trainable_token_indices:  # the user's config, with the new ChatML rows trained
            lora = dataclasses.replace(lora, trainable_token_indices=rows)
        model = get_peft_model(model, lora)
    if fuse and hasattr(model, "peft_config"):
        fused["LoRA dropouts"] = fuse_lora_dropout(model)  # same dropout, drawn faster, one bool mask instead of two fp32 copies
        fused["LoRA layers"] = fuse_lora_linears(model)  # each plain LoRA layer as one function: scales folded
    if fused:
        log.info("fast path: fused %s", ", ".join(f"{n} {k}" + ("" if n else f" ({UNFUSED[k]})") for k, n in fused.items()))
    return model


# Why a part of the fast path found nothing to fuse in a model (the rest of the model trains as it is).
UNFUSED = {
    "gated MLPs": "no Llama-style gated MLP whose forward orpo recognises",
    "RMSNorms": "no Llama-style RMSNorm whose forward orpo recognises",
    "LoRA dropouts": "lora dropout is 0, or the adapters are not plain LoRA",
    "LoRA layers": "the LoRA layers wrap no plain Linear: 4-bit or other quantized base layers keep peft's forward",
}


def keep_4bit_layout(model) -> None:
    """Keep bitsandbytes from repacking the 4-bit weights for CPU inference. On a CPU with AVX512-BF16,
    bitsandbytes (0.50) repacks a Linear4bit's weight the first time the layer runs in eval mode without
    gradients (orpo's evaluations) and from then on, training too, multiplies through a bf16 kernel that has no
    backward: no gradient through the 4-bit layers, bf16 instead of the compute dtype, and under FSDP2 every
    re-gathered shard read in the wrong layout (the FSDP2 QLoRA test in tests/test_distributed.py)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False

def new_token_rows(model, new_token_ids: list[int]) -> dict[str, list[int]]:
    """Layers whose rows for the new ChatML tokens must train: input embeddings, and the output head
    when it is not tied to them (else the model could never learn to emit <|im_end|>). Saved with the adapter."""
    if not new_token_ids:
        return {}
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names[embed]: list(new_token_ids)}
    if head is not None and head.weight is not embed.weight:
        rows[names[head]] = list(new_token_ids)
    return rows


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameters; whole counts also for weights ZeRO-3 partitioned at loading (ds_numel)."""
    def size(p) -> int:
        return getattr(p, "ds_numel", p.numel())

    return sum(size(p) for p in model.parameters() if p.requires_grad), sum(size(p) for p in model.parameters())


def save_final(model, tokenizer, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Adapter (or full model) with tokenizer and chat template; loads with transformers/peft as it is.
    Written as a whole or not at all (files.atomic_folder): `final/` with no weights never exists.
    `state`: the weights to write when the model's own are shards (FSDP2, ZeRO-3), gathered by engine.full_state."""
    with atomic_folder(out_dir) as tmp:
        if hasattr(model, "peft_config"):
            # New ChatML rows travel as trainable-token weights; peft would otherwise also save the whole resized
            # embedding matrices (2 GB for Llama 3 8B). Loaders resize the base to len(tokenizer) first.
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False, state_dict=state)
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        tokenizer.save_pretrained(tmp)
    return out_dir
