"""The weights of a run's merged model, one tensor at a time: what `orpo export` and `orpo merge` stream from.

A merged model never has to exist in memory. Each tensor is read from the base model's safetensors shards
with plain file reads (no mmap, so the pages read are page cache, not the process's memory), and, for an
adapter run, changed on the spot the way peft's `merge_and_unload` changes it:

    W + (lora_alpha / r) * B @ A          (alpha / sqrt(r) with use_rslora), in fp32, for each LoRA target
    rows past the base vocabulary         the mean of the old rows (model.chat_format.resize_embeddings)
    trained token rows                    the adapter's `trainable_tokens_delta` rows (ChatML tokens)

Memory is one tensor in fp32 plus the adapter (megabytes). What streaming cannot do exactly (DoRA, modules
saved whole, rank patterns, a GGUF or .bin base, remote code, a checkpoint whose names differ from the
model's) falls back to the whole model in memory, saying why (`InMemory`). tests/test_weights.py holds the
streamed tensors equal to peft's merge, and the in-memory fallback.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class NotStreamable(Exception):
    """Why a model's weights cannot be streamed (the caller loads it whole)."""


class Shards:
    """The tensors of one or more safetensors files, read one at a time with plain reads."""

    def __init__(self, files: list[Path]):
        self.index: dict[str, tuple[Path, int, str, list[int], int]] = {}  # name -> file, offset, dtype, shape, bytes
        for file in files:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                start, end = entry["data_offsets"]
                self.index[name] = (file, 8 + size + start, entry["dtype"], entry["shape"], end - start)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def names(self) -> list[str]:
        return list(self.index)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.index[name][3])

    def read(self, name: str) -> torch.Tensor:
        file, offset, dtype, shape, nbytes = self.index[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise NotStreamable(f"{file.name}: tensor {name} has dtype {dtype}")
        buffer = bytearray(nbytes)
        with open(file, "rb") as f:
            f.seek(offset)
            f.readinto(buffer)
        if not nbytes:
            return torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])
        return torch.frombuffer(buffer, dtype=SAFETENSORS_DTYPES[dtype]).reshape(shape)


def shard_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # only the shards the index names (a folder may hold other safetensors files)
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [f for f in files if f.name != "adapter_model.safetensors"]


class Weights:
    """The merged model's state dict, lazily: `names()`, `shape(name)`, `get(name)` (fp32), `config`.
    Also a Mapping (name -> fp32 tensor), the form accelerate's offloading hooks read weights from."""

    streamed = True

    def __init__(self, config, shapes: dict[str, tuple[int, ...]], read):
        self.config = config
        self._shapes = shapes
        self._read = read

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        return self._read(name)

    @property
    def n_params(self) -> int:
        return sum(_numel(s) for s in self._shapes.values())

    def as_mapping(self) -> Mapping[str, torch.Tensor]:
        return _Lazy(self)


class InMemory(Weights):
    """A loaded model seen as Weights (the fallback): its state dict, tied output layer left out."""

    streamed = False

    def __init__(self, model):
        state = model.state_dict()
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        shapes = {k: tuple(v.shape) for k, v in state.items() if not (k == "lm_head.weight" and tied)}
        super().__init__(model.config, shapes, lambda name: state[name].detach().to(torch.float32))
        self.model = model


class _Lazy(Mapping):
    def __init__(self, weights: Weights):
        self.weights = weights

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and name not in self.weights._shapes:  # tied
            name = "model.embed_tokens.weight" if "model.embed_tokens.weight" in self.weights._shapes else name
        return self.weights.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights.names())

    def __len__(self) -> int:
        return len(self.weights.names())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------- where the weights are


def model_folder(config) -> Path:
    """The local folder holding the base model's config.json and safetensors shards (fetched from the Hub when
    the model is a Hub id: only config and shards, not the .bin copies some repositories also keep)."""
    from ..hub_errors import hub_errors
    from ..model.load import model_source

    source, kwargs = model_source(config)
    if kwargs.get("gguf_file"):
        raise NotStreamable("the base model is a GGUF file")
    if kwargs.get("trust_remote_code"):
        raise NotStreamable("the model runs its own code")
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    with hub_errors(source, revision=config.model.revision):
        return Path(snapshot_download(source, revision=config.model.revision,
                                      allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json"]))


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes of the model `config` builds (on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not (k == "lm_head.weight" and tied)}


def folder_weights(folder: Path, tokenizer, new_token_ids: list[int]) -> Weights:
    """A plain model folder (merged, full fine-tuning, a base model) streamed as it is."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    files = shard_files(folder)
    if not files:
        raise NotStreamable(f"{folder} has no safetensors weights")
    shards = Shards(files)
    shapes = meta_shapes(config)
    _same_names(shards, shapes, folder)
    rows = shapes.get("model.embed_tokens.weight", (len(tokenizer),))[0]
    if new_token_ids or rows < len(tokenizer):
        raise NotStreamable("the tokenizer has tokens the embeddings lack (new ChatML rows)")
    return Weights(config, shapes, lambda name: shards.read(name).to(torch.float32))


def _same_names(shards: Shards, shapes: dict, folder: Path) -> None:
    missing = [n for n in shapes if n not in shards]
    wrong = [n for n in shapes if n in shards and shards.shape(n) != shapes[n]]
    if missing or wrong:
        raise NotStreamable(f"{folder}: the checkpoint's tensor names or shapes differ from the model's "
                            f"(missing {missing[:2]}, other shape {wrong[:2]})")


# ---------------------------------------------------------------- an adapter run


LORA_UNSUPPORTED = ("use_dora", "modules_to_save", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                    "layer_replication", "target_parameters", "alora_invocation_tokens")


def adapter_weights(target, tokenizer, new_token_ids: list[int]) -> Weights:
    """The base model's shards with the run's LoRA adapter (final/) folded in, tensor by tensor."""
    from transformers import AutoConfig

    final = target.final_dir
    spec = json.loads((final / "adapter_config.json").read_text())
    if spec.get("peft_type") != "LORA":
        raise NotStreamable(f"adapter type {spec.get('peft_type')}")
    odd = [k for k in LORA_UNSUPPORTED if spec.get(k)]
    if odd:
        raise NotStreamable(f"the adapter sets {', '.join(odd)}")
    folder = model_folder(target.config)
    config = AutoConfig.from_pretrained(folder)
    base_files = shard_files(folder)
    if not base_files:
        raise NotStreamable(f"{folder} has no safetensors weights")
    shards = Shards(base_files)
    base_shapes = meta_shapes(config)
    _same_names(shards, base_shapes, folder)
    adapter = Shards([final / "adapter_model.safetensors"])
    scale = spec["lora_alpha"] / (spec["r"] ** 0.5 if spec.get("use_rslora") else spec["r"])

    embed_name = "model.embed_tokens.weight"
    old_rows = base_shapes[embed_name][0] if embed_name in base_shapes else None
    rows = old_rows
    if old_rows is not None and (new_token_ids or old_rows < len(tokenizer)):
        rows = max(old_rows, len(tokenizer))
    resized = {n for n in (embed_name, "lm_head.weight") if n in base_shapes and rows != old_rows}
    if resized:
        config.vocab_size = rows
    shapes = {n: ((rows, *s[1:]) if n in resized else s) for n, s in base_shapes.items()}

    lora: dict[str, tuple[str, str]] = {}
    for name in adapter.names():
        if name.endswith(".lora_A.weight"):
            module = name[len("base_model.model."):-len(".lora_A.weight")]
            lora[module + ".weight"] = (name, name.replace(".lora_A.", ".lora_B."))
        elif name.endswith(".trainable_tokens_delta") or ".lora_" in name:
            continue
        else:
            raise NotStreamable(f"the adapter holds {name}, which the streamed merge does not apply")
    token_rows = {}
    for module, indices in (spec.get("trainable_token_indices") or {}).items():
        key = next((n for n in adapter.names() if n.endswith(f"{module}.token_adapter.trainable_tokens_delta")), None)
        if key is None:
            raise NotStreamable(f"trainable_token_indices names {module} but the adapter has no rows for it")
        weight = key[len("base_model.model."):-len(".token_adapter.trainable_tokens_delta")] + ".weight"
        token_rows[weight] = (list(indices), key)
    if "lm_head.weight" not in shapes and "lm_head.weight" in token_rows:  # tied: the rows live in the embeddings
        token_rows.setdefault(embed_name, token_rows.pop("lm_head.weight"))
    unknown = [n for n in [*lora, *token_rows] if n not in shapes]
    if unknown:
        raise NotStreamable(f"the adapter changes {unknown[0]}, which the base model does not have")

    def read(name: str) -> torch.Tensor:
        w = shards.read(name).to(torch.float32)
        if name in resized:
            w = torch.cat([w, w.mean(0, keepdim=True).expand(rows - old_rows, *w.shape[1:])])
        if name in lora:
            a, b = (adapter.read(k).to(torch.float32) for k in lora[name])
            w = w + scale * (b @ a)
        if name in token_rows:
            indices, key = token_rows[name]
            w = w.clone() if not w.is_contiguous() else w
            w[torch.tensor(indices)] = adapter.read(key).to(torch.float32)
        return w

    return Weights(config, shapes, read)


def merged_weights(target) -> tuple[Weights, object]:
    """(the merged model's Weights, tokenizer) of a run, merged folder or model: streamed when it can be,
    else the merged model loaded whole (the reason logged)."""
    from ..model.load import load_tokenizer

    tokenizer, new_ids = load_tokenizer(target.config)
    try:
        if target.is_adapter:
            return adapter_weights(target, tokenizer, new_ids), tokenizer
        folder = target.final_dir if target.kind == "run" else model_folder(target.config)
        return folder_weights(folder, tokenizer, new_ids), tokenizer
    except NotStreamable as why:
        log.warning("loading the whole model in fp32 (%s)", why)
    from .runs import merged_model

    model, tokenizer = merged_model(target)
    return InMemory(model), tokenizer
