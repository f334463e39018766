"""`orpo merge`: fold a run's LoRA adapter into its base weights and save a plain 16-bit model, then check it.

The merged model is written one tensor at a time (after.weights.merged_weights): each tensor is read from the
base model's safetensors files, merged in fp32 the way peft's `merge_and_unload` merges it (B·A·scale added to
each LoRA target; the trained ChatML rows, `trainable_token_indices`, see model.new_token_rows, written into
the embedding and output matrices), cast to the chosen dtype (each weight rounded once: merging in bf16 would
round the base and then the sum) and its bytes written straight into its shard, behind a header computed from
the shapes. Memory: one tensor in fp32 (the largest, the embedding matrix: 0.5 GB for Llama 3 8B) plus the
adapter, not the model. The shards are laid out as transformers lays them out (huggingface_hub's split: at
most `max_shard_size` each, model-00001-of-0000N.safetensors + model.safetensors.index.json, or one
model.safetensors); a tied output layer is not written. What cannot be streamed (DoRA, remote code, a GGUF
base, ...: see after.weights) falls back to the whole model loaded in fp32, merged by peft and saved by
transformers: 4 bytes per parameter (32 GB for an 8B model), as every merge needed before.

Check: the saved model, reloaded from disk, is compared with the unmerged adapter model on a few chat prompts,
one model in memory at a time (the reference logits are computed and the adapter model freed before the merged
one loads), both computed in fp32. Up to 1e9 parameters (FP32_CHECK_MAX_PARAMS) both are loaded in fp32, so the
difference measures the merge and the rounding of the merged weights to the chosen dtype; the peak is one fp32
model (4 bytes per parameter). Above that both are loaded in the merged dtype and run through fp32_arithmetic
(each block cast to fp32 for its forward; the merged model's logits are then those of its fp32 load, bit for
bit): the peak is one 16-bit model (2 bytes per parameter), and the difference also holds the rounding of the
base weights (on the demo model, forced through this path: 0.943 instead of 0.930, of max |logit| 40.2); the
check line and orpo_merge.json's `weights_dtype` say so. 16-bit arithmetic is not used: on the demo model it
alone moves the logits by 1.5 times the bf16 tolerance. The tolerance is relative to the largest logit: 4
units of the dtype's rounding (torch.finfo(dtype).eps: bf16 2^-7, fp16 2^-10), and at least 1e-5 (in fp32 the
merged and unmerged models add the same terms in another order).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..data.pairs import end_of_turn_id
from .card import write_card
from .runs import MERGED_CONFIG, load, prompt_logits, resolve
from .weights import SAFETENSORS_DTYPES, Shards, Weights, merged_weights, shard_files

log = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Max |logit difference| allowed, as a share of the largest |logit|: 4 units of the dtype's rounding, >= 1e-5.
TOLERANCE = {name: max(4 * torch.finfo(getattr(torch, dtype)).eps, 1e-5) for name, dtype in DTYPES.items()}
PROMPTS = [
    "What is 12 + 7? Reply with only the number.",
    "Write one sentence about the sea.",
    "Which number is larger, 736 or 551? Reply with only the number.",
]
# Up to this many parameters the check loads both models in fp32; above, in the merged dtype (half the memory).
FP32_CHECK_MAX_PARAMS = 1e9
HALF = (torch.bfloat16, torch.float16)


@dataclass
class MergeCheck:
    max_abs_diff: float
    scale: float  # largest |logit| of the reference
    tolerance: float  # allowed max_abs_diff = TOLERANCE[dtype] * scale
    top1_agreement: float  # share of positions whose argmax token agrees
    adapter_effect: float | None  # max |logit change| the adapter makes on the base: what a lost merge would show
    weights_dtype: str = "fp32"  # both models' weights: fp32, or the merged dtype above FP32_CHECK_MAX_PARAMS

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def merge_run(run_dir: str | Path, dtype: Literal["bf16", "fp16", "fp32"], out: str | Path, max_shard_size: str = "2GB",
              overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Merged model + tokenizer + chat template + generation_config (eos = end of turn) + the run's config,
    streamed tensor by tensor (the whole model in memory only when it cannot be streamed)."""
    run_dir, out = Path(run_dir), Path(out)
    target = resolve(str(run_dir), overrides)
    if target.kind != "run":
        raise ValueError(f"{run_dir} is not a run folder (config.yaml + final/)")
    weights, tokenizer = merged_weights(target)
    torch_dtype = getattr(torch, DTYPES[dtype])
    eot = end_of_turn_id(tokenizer)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if weights.streamed:
        write_weights(weights, torch_dtype, out, max_shard_size)
        config = merged_config(weights.config, DTYPES[dtype], eot, tokenizer.pad_token_id)
        config.save_pretrained(out)
        generation = base_generation_config(target, weights.config)
        generation.eos_token_id, generation.pad_token_id = eot, tokenizer.pad_token_id
        generation.save_pretrained(out)
    else:
        model = weights.model
        del weights  # its state dict holds the fp32 tensors: let each go as it is cast
        model = model.to(torch_dtype)  # one rounding per weight
        model.generation_config.eos_token_id = eot
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = eot
        model.config.name_or_path = str(out)
        model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    shutil.copy(run_dir / "config.yaml", out / MERGED_CONFIG)
    return out


# ---------------------------------------------------------------- the streamed writer


def write_weights(weights: Weights, dtype: torch.dtype, out: Path, max_shard_size: str) -> None:
    """`weights` cast to `dtype`, in safetensors shards of at most `max_shard_size` laid out as transformers'
    save_pretrained lays them out: huggingface_hub's split, in state-dict order (transformers 5 sorts the names
    of some architectures first: which tensors share a shard matters to no loader), a tensor larger than the
    limit in a shard of its own. Each tensor is computed, cast and written on its own: one tensor in memory."""
    from huggingface_hub import split_state_dict_into_shards_factory

    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = {name: math.prod(weights.shape(name)) * itemsize for name in weights.names()}
    split = split_state_dict_into_shards_factory(nbytes, get_storage_size=lambda n: n, max_shard_size=max_shard_size,
                                                 filename_pattern="model{suffix}.safetensors")
    for file, names in split.filename_to_tensors.items():
        write_shard(out / file, [(name, weights.shape(name), nbytes[name]) for name in names], weights.get, dtype)
    if split.is_sharded:  # the index transformers writes (total_parameters, total_size in bytes, weight_map)
        index = {"metadata": {"total_parameters": weights.n_params, **split.metadata}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_shard(path: Path, entries: list[tuple[str, tuple[int, ...], int]], get, dtype: torch.dtype) -> None:
    """One safetensors file: the header (8-byte little-endian length, JSON of names, dtypes, shapes and byte
    offsets, padded with spaces to a multiple of 8 as safetensors pads it) worked out from the shapes alone,
    then each tensor's bytes as `get(name)` returns it, cast to `dtype` (torch's byte order: little-endian)."""
    code = {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, size in entries:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape, _ in entries:
            tensor = get(name).to(dtype).contiguous()  # one rounding per weight
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"merged tensor {name} has shape {tuple(tensor.shape)}, the header says {tuple(shape)}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy())  # its bytes, not copied
            del tensor  # before the next one is made


def merged_config(config, dtype: str, eot: int, pad: int | None):
    """The merged model's config.json: the base's (vocabulary resized) with what save_pretrained and `orpo
    merge` set: dtype, architectures, eos = the end-of-turn id, pad."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = copy.deepcopy(config)
    config.dtype = dtype
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]
    config.eos_token_id = eot
    config.pad_token_id = pad
    return config


def base_generation_config(target, config):
    """The generation config from_pretrained would give the model the run was loaded from: its
    generation_config.json, else one made from its config (transformers' fallback)."""
    from transformers import GenerationConfig

    from ..hub_errors import hub_errors
    from ..model.load import model_source

    source, kwargs = model_source(target.config) if target.is_adapter else (str(target.final_dir), {})
    try:
        with hub_errors(source, revision=kwargs.get("revision")):
            return GenerationConfig.from_pretrained(source, revision=kwargs.get("revision"))
    except OSError:
        return GenerationConfig.from_model_config(config)


# ---------------------------------------------------------------- the check


def check_merge(run_dir: str | Path, merged_dir: str | Path, dtype: str, prompts: list[str] = PROMPTS,
                overrides: list[str] | tuple[str, ...] = ()) -> MergeCheck:
    """Logits of the reloaded merged model vs the unmerged adapter model, computed in fp32, one model in memory
    at a time. Both are loaded in fp32 up to FP32_CHECK_MAX_PARAMS parameters (peak: one fp32 model), above
    that in the merged dtype and run through fp32_arithmetic (peak: one 16-bit model; the check line says so)."""
    from transformers import AutoModelForCausalLM

    target = resolve(str(run_dir), overrides)
    shards = Shards(shard_files(Path(merged_dir)))
    n_params = sum(math.prod(shards.shape(name)) for name in shards.names())
    weights_dtype = dtype if n_params > FP32_CHECK_MAX_PARAMS else "fp32"
    reference, tokenizer = load(target, dtype=DTYPES[weights_dtype], quantized=False)
    with fp32_arithmetic(reference):
        want = prompt_logits(reference, tokenizer, prompts)
        effect = None
        if hasattr(reference, "disable_adapter"):
            with reference.disable_adapter():
                base = prompt_logits(reference, tokenizer, prompts)
            effect = max(float((a - b).abs().max()) for a, b in zip(want, base, strict=True))
    del reference
    gc.collect()  # should a reference cycle hold it (peft's wrappers can), it goes now, before the merged model loads
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, DTYPES[weights_dtype]),
                                                  trust_remote_code=target.config.model.trust_remote_code).eval()
    with fp32_arithmetic(merged):
        got = prompt_logits(merged, tokenizer, prompts)
    diff = max(float((a - b).abs().max()) for a, b in zip(want, got, strict=True))
    scale = max(float(a.abs().max()) for a in want)
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(want, got, strict=True)]).mean()
    return MergeCheck(diff, scale, TOLERANCE[dtype] * scale, float(agree), effect, weights_dtype)


@contextmanager
def fp32_arithmetic(model):
    """A 16-bit model run in fp32 arithmetic, one block at a time: a module holding at most twice the largest
    tensor (a decoder layer, the embeddings, the output layer) casts its 16-bit tensors to fp32 just before its
    forward and puts the 16-bit tensors themselves back just after (a larger module, only the tensors it holds
    itself). Every module gets the hooks; the outermost one called does the casting (its inner ones find fp32
    already), so containers that are never called (ModuleList) cost nothing. The cast is exact (every 16-bit
    number is an fp32 number): the logits are those of the model loaded in fp32, bit for bit, while memory holds
    the 16-bit model plus one block in fp32. Does nothing to an fp32 model."""
    largest = max(p.numel() for p in model.parameters())
    whole = {module: sum(p.numel() for p in module.parameters()) <= 2 * largest for module in model.modules()}
    handles, saved = [], {}

    def up(module, args, kwargs):
        saved[module] = [(p, p.data) for p in module.parameters(recurse=whole[module]) if p.dtype in HALF]
        for p, data in saved[module]:
            p.data = data.float()
        return _fp32(args), _fp32(kwargs)

    def down(module, args, output):
        for p, data in saved.pop(module):
            p.data = data  # the 16-bit tensor itself: nothing rounded, nothing allocated

    for module in model.modules():
        if any(p.dtype in HALF for p in module.parameters()):
            handles.extend([module.register_forward_pre_hook(up, with_kwargs=True), module.register_forward_hook(down)])
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _fp32(value):
    """16-bit tensors (in tuples, lists and dicts too) as fp32; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in HALF else value
    if isinstance(value, (tuple, list)):
        return type(value)(_fp32(v) for v in value)
    if isinstance(value, dict):
        return {k: _fp32(v) for k, v in value.items()}
    return value


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
    how = "computed in fp32" if check.weights_dtype == "fp32" else (
        f"over {FP32_CHECK_MAX_PARAMS:.0e} parameters: weights in {check.weights_dtype}, computed in fp32")
    text = (f"logit check vs the adapter model on {len(PROMPTS)} prompts ({how}): max |diff| = {check.max_abs_diff:.3e} "
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
