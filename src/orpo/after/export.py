"""`orpo export`: a run or a model -> one GGUF file for llama.cpp and Ollama, checked by llama.cpp.

The file is streamed: the merged model's tensors come one at a time from after/weights.py (base shards + the
adapter's delta, in fp32), each is changed to llama.cpp's layout, encoded and written before the next is read;
the header and tensor table go first, computed from the shapes. Memory is one tensor, not the model. What
differs between architectures is in ARCHES: llama.cpp's Llama graph rotates q/k in interleaved pairs, so their
rows are permuted (transformers rotates halves); Gemma stores RMSNorm weights as w while llama.cpp multiplies by
them directly, so 1 is added; Gemma never writes an output layer (tied).

Metadata: sizes, head and key/value-head counts, head size, rope base (and the sliding layers' base),
rope scaling, norm epsilon, sliding window, soft-capping; the tokenizer (byte-level BPE with its
pre-tokenizer, or SentencePiece-style BPE with byte fallback), BOS/EOS/end-of-turn ids with EOS set to the chat
template's end-of-turn token (without it llama.cpp generates past the end of the reply), and the chat
template itself.

Check (after/gguf_check.py): llama.cpp runs the file and its next-token distributions are compared with the fp32
source model's (KL divergence and top-1 agreement, limits per type); the tensors are read back one at a time;
the metadata and what llama.cpp reads are compared with the config. FAIL exits 1 and removes the file.

Types f32/f16/bf16/q8_0 are written here (1-D tensors stay f32, as llama.cpp does); K-quants (Q4_K_M ...)
come from llama.cpp itself (`quantize`), from an f16 file (the output, or a temporary one when --type is
bf16 or q8_0: llama.cpp will not requantize those), and are checked like the rest."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data.pairs import bos_to_add, end_of_turn_id
from ..files import atomic_file
from . import gguf_check
from .modelfile import modelfile
from .runs import resolve
from .weights import merged_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    name: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's rope on interleaved pairs: q/k rows reordered
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's (1 + w))
    tied_output: bool = False  # never write output.weight
    read_as: str | None = None  # model type transformers' GGUF loader maps these tensors with


ARCHES = {
    "llama": Arch("LLAMA", permute_qk=True),
    "mistral": Arch("LLAMA", permute_qk=True, read_as="llama"),
    "qwen2": Arch("QWEN2"),
    "qwen3": Arch("QWEN3"),
    "gemma2": Arch("GEMMA2", norm_shift=1.0, tied_output=True),
    "gemma3_text": Arch("GEMMA3", norm_shift=1.0, tied_output=True),
    "phi3": Arch("PHI3"),
}
TYPES = ("f32", "f16", "bf16", "q8_0")
ROPE_FREQS = "rope_freqs.weight"
K_QUANTS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q4_0", "Q5_0", "Q8_0")
FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
# Byte-level BPE pre-tokenizers llama.cpp knows, by the tokenizer.json structure that defines them.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


class ExportError(ConfigError):
    """Bad input to export or serve: one line, exit 2."""


def supported_problem(config) -> str | None:
    kind = getattr(config, "model_type", "?")
    if kind == "gemma3":
        return ("model type 'gemma3' is Gemma 3 with its vision tower (4B, 12B, 27B): export its text model instead, a "
                "checkpoint of model_type 'gemma3_text' (Gemma3ForCausalLM.from_pretrained(...).save_pretrained(FOLDER), "
                "then train or export FOLDER; the 270M and 1B checkpoints are text models already)")
    if kind not in ARCHES:
        return f"model type '{kind}' cannot be exported to GGUF; supported: {', '.join(sorted(ARCHES))}"
    return None


def source_problem(target) -> str | None:
    """supported_problem of the model `target` names, read from its config.json alone (nothing loaded)."""
    from transformers import AutoConfig

    from ..model.load import model_source

    try:
        if target.kind == "run" and not target.is_adapter:
            return supported_problem(AutoConfig.from_pretrained(target.final_dir))
        source, kwargs = model_source(target.config)
        return supported_problem(AutoConfig.from_pretrained(source, **kwargs))
    except (OSError, ValueError, KeyError):
        return None  # the loading that follows says what is wrong


# ---------------------------------------------------------------- tensors


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows (per head: first half, second half of the rotary dims) -> llama.cpp's order
    (per head: the pairs interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(name: str, w: torch.Tensor, config, arch: Arch) -> torch.Tensor:
    """One fp32 weight as llama.cpp reads it: q/k rows permuted (Llama graph), norms shifted (Gemma)."""
    if arch.permute_qk and name.endswith("q_proj.weight"):
        w = permute_rows(w, config.num_attention_heads)
    elif arch.permute_qk and name.endswith("k_proj.weight"):
        w = permute_rows(w, config.num_key_value_heads)
    if arch.norm_shift and name.endswith("norm.weight"):
        w = w + arch.norm_shift
    return w


def tensor_names(weights, arch: Arch) -> dict[str, str]:
    """transformers name -> GGUF name, for every weight the runtime reads (a tied output layer is not written)."""
    import gguf

    config = weights.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.name), config.num_hidden_layers)
    out = {}
    for key in weights.names():
        if key == "lm_head.weight" and arch.tied_output:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{key}: no GGUF name for this weight ({config.model_type}); the export would be incomplete")
        out[key] = name
    return out


def stored_type(kind: str, shape: tuple[int, ...]) -> str:
    """The GGML type a tensor of `shape` is written in: 1-D tensors (norms, biases) stay f32, as llama.cpp keeps
    them; q8_0 rows not in blocks of 32 fall back to f16, as llama.cpp's converter does."""
    if kind == "f32" or len(shape) == 1:
        return "f32"
    if kind == "q8_0" and shape[-1] % 32:
        return "f16"
    return kind


def encode_tensor(data: np.ndarray, kind: str) -> np.ndarray:
    """fp32 array -> the bytes (or f16/f32 array) of `kind` (from stored_type)."""
    import gguf

    if kind == "f32":
        return data.astype(np.float32)
    if kind == "f16":
        return data.astype(np.float16)
    return gguf.quants.quantize(data, getattr(gguf.GGMLQuantizationType, kind.upper()))


def tensor_info(kind: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], type, int, object]:
    """(shape as given to the writer, numpy dtype, bytes, raw GGML type or None) of a tensor stored as `kind`."""
    import gguf

    if kind in ("f32", "f16"):
        dtype = np.float32 if kind == "f32" else np.float16
        return shape, dtype, int(np.prod(shape)) * np.dtype(dtype).itemsize, None
    raw = getattr(gguf.GGMLQuantizationType, kind.upper())
    byte_shape = gguf.quant_shape_to_byte_shape(shape, raw)
    return byte_shape, np.uint8, int(np.prod(byte_shape)), raw


def rope_factors(config) -> np.ndarray | None:
    """Llama 3.1-style rope scaling as llama.cpp takes it: per rotary frequency, the divisor of its angle
    (the default inverse frequency over transformers' scaled one), written as the `rope_freqs` tensor."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    full, _ = rope(config)
    if full.get("rope_type") != "llama3":
        return None
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    default = 1.0 / (float(full["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    return (default / scaled.to(torch.float64)).to(torch.float32).numpy()


# ---------------------------------------------------------------- metadata


def rope(config) -> tuple[dict, dict | None]:
    """(full-attention rope parameters, sliding layers' or None) from a transformers 5 config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        return dict(params["full_attention"]), params.get("sliding_attention")
    if not params and getattr(config, "rope_theta", None) is not None:
        params = {"rope_theta": config.rope_theta, **(getattr(config, "rope_scaling", None) or {})}
    return params, None


def write_hparams(writer, config, arch: Arch, file_type: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    full, sliding = rope(config)
    share = full.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    writer.add_rope_dimension_count(int(share * head_dim))
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if sliding and sliding.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    kind, factor = full.get("rope_type", "default"), full.get("factor")
    if kind == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3", None):  # llama3: the rope_freqs tensor (rope_factors)
        raise ExportError(f"rope scaling '{kind}' is not exported yet (supported: none, linear, yarn, llama3)")
    window = getattr(config, "sliding_window", None)
    uses_window = "sliding_attention" in (getattr(config, "layer_types", None) or []) or arch.name in ("GEMMA2", "PHI3")
    layer_types = getattr(config, "layer_types", None) or []
    if window and uses_window:
        writer.add_sliding_window(int(window))
        if arch.name.startswith("GEMMA") and "sliding_attention" in layer_types:  # which layers slide (else llama.cpp
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])  # assumes its own)
    elif arch.name == "PHI3":
        writer.add_sliding_window(0)
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPE[file_type]))


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, read off tokenizer.json."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if splits == [LLAMA3_SPLIT]:
        return "llama-bpe"
    if splits == [QWEN2_SPLIT]:
        return "qwen2"
    raise ExportError(f"this tokenizer's pre-tokenizer ({kinds}) is not one the export knows "
                      "(GPT-2, SmolLM, Llama 3, Qwen2, or SentencePiece-style BPE)")


def space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before a text (Llama 2: yes; Gemma: no)."""
    text = json.dumps({"normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer")})
    metaspace = '"Metaspace"' in text and '"prepend_scheme": "never"' not in text
    return '"Prepend"' in text or metaspace


def write_tokenizer(writer, tokenizer, n_rows: int, folder: Path) -> None:
    """Tokens, types, merges or scores, pre-tokenizer, special ids (EOS = end of turn), add-BOS, chat template.
    `n_rows`: the embedding matrix's rows; ids past the tokenizer's are padding entries."""
    import gguf

    tokenizer.save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec["model"]
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in spec.get("added_tokens", [])}
    if model["type"] == "BPE" and not model.get("byte_fallback"):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(spec))
        vocab = {**model["vocab"], **{a["content"]: a["id"] for a in spec.get("added_tokens", [])}}
        by_id = {i: t for t, i in vocab.items()}
        tokens, types, scores = [], [], None
        for i in range(max(n_rows, len(by_id))):
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added or i not in by_id else gguf.TokenType.NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_token_merges(merges)
    elif model["type"] == "BPE":  # SentencePiece-style: byte fallback, scores
        hf = gguf.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for i, (text, score, kind) in enumerate(hf.all_tokens()):  # added tokens: tokenizer.json's `special` flag
            tokens.append(text)  # decides (LlamaHfVocab knows only the bos/eos/unk/pad attributes, not <|im_end|>)
            scores.append(score)
            if kind == gguf.TokenType.NORMAL and i in added:
                kind = gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED
            types.append(kind)
        for i in range(len(tokens), n_rows):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.USER_DEFINED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(space_prefix(spec))
    else:
        raise ExportError(f"tokenizer model '{model['type']}' is not exported (byte-level BPE or SentencePiece-style BPE)")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    eot = end_of_turn_id(tokenizer)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(eot)
    writer.add_eot_token_id(eot)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(bos_to_add(tokenizer) is not None)
    writer.add_add_eos_token(False)
    if not tokenizer.chat_template:
        raise ExportError("the tokenizer has no chat template: llama.cpp and Ollama could not format a conversation")
    writer.add_chat_template(tokenizer.chat_template)


def write_gguf(weights, tokenizer, path: Path, kind: str, name: str, transform=to_gguf) -> None:
    """The whole file at `path` (not atomic: export_gguf writes to a temporary name), streamed: the header and
    tensor table first, then each tensor read, changed (`transform`), encoded and written, one at a time."""
    import gguf
    from tqdm.auto import tqdm

    config = weights.config
    arch = ARCHES[config.model_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.name)])
    writer.add_name(name)
    write_hparams(writer, config, arch, kind)
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(writer, tokenizer, weights.shape("model.embed_tokens.weight")[0], Path(folder))
    names = tensor_names(weights, arch)
    for key, gname in names.items():
        shape, dtype, nbytes, raw = tensor_info(stored_type(kind, weights.shape(key)), weights.shape(key))
        writer.add_tensor_info(gname, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
    factors = rope_factors(config)
    if factors is not None:
        writer.add_tensor_info(ROPE_FREQS, factors.shape, factors.dtype, factors.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key in tqdm(names, desc=f"writing {Path(path).name}", unit="tensor", leave=False):
        w = transform(key, weights.get(key), config, arch)
        writer.write_tensor_data(encode_tensor(w.numpy(), stored_type(kind, tuple(w.shape))))
        del w
    if factors is not None:
        writer.write_tensor_data(factors)
    writer.close()


# ---------------------------------------------------------------- K-quants (llama.cpp)


NO_QUANTIZER = ("--quantize {} needs llama.cpp's quantizer: pip install 'orpo[serve]' (builds llama-cpp-python) "
                "or put llama.cpp's llama-quantize on PATH")


def quantizer() -> tuple[str, str] | None:
    """('python', module) when llama-cpp-python is installed, ('binary', path) for llama-quantize on PATH."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return "python", "llama_cpp"
    binary = shutil.which("llama-quantize")
    return ("binary", binary) if binary else None


def quantize(source: Path, out: Path, name: str) -> None:
    """llama.cpp's quantizer: `source` (f16/f32 GGUF) -> `out` in the K-quant `name`."""
    how = quantizer()
    if how is None:
        raise ExportError(NO_QUANTIZER.format(name))
    if how[0] == "binary":
        subprocess.run([how[1], str(source), str(out), name], check=True)
        return
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0 or not out.is_file():
        raise RuntimeError(f"llama.cpp's quantize to {name} failed (code {code})")


# ---------------------------------------------------------------- the command


def check_prompts(config, tokenizer, n: int = 3) -> list[list[dict[str, str]]]:
    """The first `n` held-out prompts, read without tokenizing anything and without the network (the builtin
    set, or data on disk); the fixed prompts of `orpo merge` when the data is elsewhere or has no test split."""
    from ..data.formats import to_messages
    from ..data.sources import DataReport, build_rows, entries
    from ..data.templated import Untemplater
    from .merge import PROMPTS

    data = config.data
    try:
        if data.builtin:
            from ..data.builtin_tasks import generate, prompt_messages

            _, rows = generate(0, max(n, data.builtin_eval_size), seed=data.shuffle_seed)
            return [prompt_messages(r) for r in rows[:n]]
        paths = [e.path for e in entries(data)] + ([data.eval_path] if data.eval_path else [])
        if all(Path(p).expanduser().exists() for p in paths):
            _, held_out = build_rows(data, DataReport(), Untemplater(tokenizer))
            if held_out is not None and len(held_out):
                return [to_messages(held_out[i])["prompt"] for i in range(min(n, len(held_out)))]
    except Exception as exc:  # noqa: BLE001 - the data only gives the check its prompts: the fixed ones do as well
        log.info("held-out prompts unavailable (%s); using fixed prompts", exc)
    return [[{"role": "user", "content": p}] for p in PROMPTS]


def source_weights(spec: str, overrides: list[str] | tuple[str, ...] = ()):
    """(the merged model's Weights, tokenizer, check prompts) of a run, merged folder or model."""
    target = resolve(spec, overrides)
    if target.kind == "run" and not (target.final_dir / "adapter_config.json").is_file() and not (target.final_dir / "config.json").is_file():
        raise FileNotFoundError(f"{spec}: final/ holds neither an adapter nor a model")  # a file error, exit 1 as in resolve
    problem = source_problem(target)
    if problem:
        raise ExportError(problem)
    weights, tokenizer = merged_weights(target)
    problem = supported_problem(weights.config)
    if problem:
        raise ExportError(problem)
    return weights, tokenizer, check_prompts(target.config, tokenizer)


def export_gguf(spec: str, out: str | Path, kind: str = "f16", quantize_to: list[str] | tuple[str, ...] = (),
                with_modelfile: bool = False, force: bool = False, overrides: list[str] | tuple[str, ...] = (),
                transform=to_gguf) -> dict:
    """Write, check and (optionally) quantize; returns what it measured. Raises ExportError on bad input,
    CheckFailed (after removing the file) when a check fails. `transform`: how a weight becomes the file's
    (the tests pass broken ones)."""
    out = Path(out)
    quantize_to = [q.upper() for q in quantize_to]
    if kind not in TYPES:
        raise ExportError(f"--type {kind}: not one of {', '.join(TYPES)} (K-quants: --quantize)")
    bad = [q for q in quantize_to if q not in K_QUANTS]
    if bad:
        raise ExportError(f"--quantize {bad[0]}: not one of {', '.join(K_QUANTS)}")
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: the output must end in .gguf")
    outputs = [out, *[quant_path(out, q) for q in quantize_to]] + ([out.with_name("Modelfile")] if with_modelfile else [])
    taken = [str(p) for p in outputs if p.exists()]
    if taken and not force:
        raise ExportError(f"{taken[0]} exists (add --force to replace it)")
    if quantize_to and quantizer() is None:
        raise ExportError(NO_QUANTIZER.format(quantize_to[0]))
    weights, tokenizer, prompts = source_weights(spec, overrides)
    arch = ARCHES[weights.config.model_type]
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"source": spec, "type": kind, "parameters": weights.n_params, "streamed": weights.streamed}
    reference = gguf_check.reference(weights, tokenizer, prompts)  # the source model runs here, then is dropped
    names = tensor_names(weights, arch)
    name = Path(spec).name or spec

    def checked(path: Path, label: str, make) -> None:
        started = time.perf_counter()
        with atomic_file(path) as tmp:
            make(tmp)
            seconds = round(time.perf_counter() - started, 1)
            check = gguf_check.check_file(tmp, weights, tokenizer, reference, label, names, transform, arch)
            entry = {"size_bytes": tmp.stat().st_size, "seconds": seconds, "check": {**check.__dict__, "passed": check.passed}}
            result.setdefault("files", {})[label] = entry
            print_check(path, label, check, entry)
            if not check.passed:
                raise CheckFailed(result)

    checked(out, kind, lambda tmp: write_gguf(weights, tokenizer, tmp, kind, name, transform))
    if quantize_to:
        with tempfile.TemporaryDirectory(dir=out.parent) as folder:  # llama.cpp quantizes from f16 or f32 only
            source = out
            if kind not in ("f16", "f32"):
                source = Path(folder) / "source.f16.gguf"
                write_gguf(weights, tokenizer, source, "f16", name, transform)
            for q in quantize_to:
                checked(quant_path(out, q), q, lambda tmp, q=q: quantize(source, tmp, q))
    if with_modelfile:
        with atomic_file(out.with_name("Modelfile")) as tmp:
            tmp.write_text(modelfile(out.name, tokenizer))
        print(f"{out.with_name('Modelfile')}: ollama create NAME -f {out.with_name('Modelfile')}")
    return result


class CheckFailed(RuntimeError):
    def __init__(self, result: dict):
        super().__init__("llama.cpp's check of the GGUF failed")
        self.result = result


def quant_path(out: Path, name: str) -> Path:
    return out.with_name(f"{out.stem}.{name.upper()}.gguf")


def print_check(out: Path, label: str, check, entry: dict) -> None:
    verdict = "PASS" if check.passed else "FAIL"
    kl, worst, top1 = gguf_check.limits(check.kind)
    print(f"{out}: {label}, {entry['size_bytes'] / 2**20:.1f} MiB, written in {entry['seconds']} s")
    print(f"  llama.cpp vs the source model on {len(check.prompt_lengths)} prompts ({check.positions} positions, the longest "
          f"{max(check.prompt_lengths)} tokens): mean KL {check.kl_mean:.2e} nats (limit {kl:g}), worst prompt "
          f"{check.kl_worst_prompt:.2e} (limit {worst:g}), top-1 agreement {100 * check.top1:.1f}% (at least {100 * top1:g}%)")
    print(f"  tokens {'the same' if check.same_ids else 'DIFFERENT'}; tensors read back within {check.tensor_error:.1e} "
          f"(relative RMS); metadata {'as the model implies' if not check.problems else 'DIFFERENT'}: {verdict}")
    for line in [*check.problems[:12], *check.notes]:
        print(f"  {line}")


def run_export(spec: str, out: str, kind: str, quantize_to: list[str], with_modelfile: bool, force: bool,
               overrides: list[str]) -> int:
    """`orpo export`: exit 0 PASS, 1 FAIL (no file left); raised to the CLI: a missing file or folder (a run without
    final/: FileNotFoundError, exit 1), a Hub failure (HubError, exit 1), bad options (ExportError, exit 2)."""
    try:
        export_gguf(spec, out, kind, quantize_to, with_modelfile, force, overrides)
    except CheckFailed:
        return 1
    return 0
