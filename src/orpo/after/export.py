"""`orpo export`: a run or a model -> one GGUF file for llama.cpp and Ollama, read back and checked.

An adapter run is merged in memory first (merge.merged_model: fp32, the adapter folded in); a merged folder or
a fully trained run is used as it is. The file is written with the `gguf` package's writer and its tensor-name
maps. What differs between architectures is in ARCHES: llama.cpp's Llama graph rotates q/k in interleaved
pairs, so their rows are permuted (transformers rotates halves); Gemma stores RMSNorm weights as w while
llama.cpp multiplies by them directly, so 1 is added; Gemma never writes an output layer (tied).

Metadata: sizes, head and key/value-head counts, head size, rope base (and the sliding layers' base),
rope scaling, norm epsilon, sliding window, soft-capping; the tokenizer (byte-level BPE with its
pre-tokenizer, or SentencePiece-style BPE with byte fallback), BOS/EOS/end-of-turn ids with EOS set to the chat
template's end-of-turn token (without it llama.cpp generates past the end of the reply), and the chat
template itself.

Check: the written file is read back by transformers' GGUF loader (its own inverse of every step above) into
a model built from the source config; the logits of both on the run's held-out prompts are compared with a
tolerance that follows the type (TOLERANCE, relative to the largest |logit|), and the config fields the loader
reads from the file must equal the source's. FAIL exits 1 and removes the file.

Types f32/f16/bf16/q8_0 are written here (1-D tensors stay f32, as llama.cpp does); K-quants (Q4_K_M ...)
come from llama.cpp itself (`quantize`), from the f16 file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data.pairs import bos_to_add, end_of_turn_id
from ..files import atomic_file
from .runs import resolve

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
# Max |logit difference| of the read-back check, as a share of the largest |logit| (measured on the demo model:
# README "Run the model"): f32 is exact up to summation order; f16 and bf16 round each weight once (2^-11,
# 2^-8 relative); q8_0 rounds to 1/254 of each block of 32's largest weight.
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 4e-2, "q8_0": 6e-2}
K_QUANTS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q4_0", "Q5_0", "Q8_0")
FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
# Byte-level BPE pre-tokenizers llama.cpp knows, by the tokenizer.json structure that defines them.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


class ExportError(ConfigError):
    """Bad input to export or serve: one line, exit 2."""


@dataclass
class ExportCheck:
    max_abs_diff: float
    scale: float  # largest |logit| of the source
    tolerance: float
    top1_agreement: float
    config_mismatches: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and not self.config_mismatches


def supported_problem(config) -> str | None:
    kind = getattr(config, "model_type", "?")
    if kind not in ARCHES:
        return f"model type '{kind}' cannot be exported to GGUF; supported: {', '.join(sorted(ARCHES))}"
    return None


# ---------------------------------------------------------------- tensors


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows (per head: first half, second half of the rotary dims) -> llama.cpp's order
    (per head: the pairs interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: Arch, permute: bool = True):
    """(gguf name, fp32 numpy array) for every weight the runtime reads."""
    import gguf

    config = model.config
    layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.name), layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tied = arch.tied_output or bool(getattr(config, "tie_word_embeddings", False))
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{key}: no GGUF name for this weight ({config.model_type}); the export would be incomplete")
        w = value.detach().to(torch.float32).cpu()
        if permute and arch.permute_qk and key.endswith("q_proj.weight"):
            w = permute_rows(w, heads)
        elif permute and arch.permute_qk and key.endswith("k_proj.weight"):
            w = permute_rows(w, kv_heads)
        if arch.norm_shift and key.endswith("norm.weight"):
            w = w + arch.norm_shift
        yield name, w.numpy()


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


def encode_tensor(data: np.ndarray, kind: str):
    """(array to write, raw GGML type or None): 1-D tensors (norms, biases) stay f32, as llama.cpp keeps them."""
    import gguf

    qt = gguf.GGMLQuantizationType
    if kind == "f32" or data.ndim == 1:
        return data.astype(np.float32), None
    if kind == "f16":
        return data.astype(np.float16), None
    if kind == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, qt.Q8_0), qt.Q8_0
    if kind == "q8_0":  # rows not in blocks of 32: f16, as llama.cpp falls back
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qt.BF16), qt.BF16


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


def write_gguf(model, tokenizer, path: Path, kind: str, name: str, permute: bool = True) -> None:
    """The whole file at `path` (not atomic: export_gguf writes to a temporary name)."""
    import gguf

    arch = ARCHES[model.config.model_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.name)])
    writer.add_name(name)
    write_hparams(writer, model.config, arch, kind)
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0], Path(folder))
    for gname, data in gguf_tensors(model, arch, permute):
        array, raw = encode_tensor(data, kind)
        writer.add_tensor(gname, array, raw_dtype=raw)  # quantized bytes: the writer derives the shape
    factors = rope_factors(model.config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


# ---------------------------------------------------------------- the check


COMPARED_CONFIG = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                   "rms_norm_eps", "vocab_size", "max_position_embeddings")


def read_back(path: Path, like):
    """A model built from `like`'s config with the weights transformers' GGUF loader reads from `path`, and the
    config fields the loader read from the file."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = like.config
    arch = ARCHES[config.model_type]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    mapper = model
    if arch.read_as:  # the loader's name map knows these tensors under another model type
        mapper = AutoModelForCausalLM.from_config(_as(config, arch.read_as))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=mapper)
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in parsed["tensors"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and (arch.tied_output or config.tie_word_embeddings))]
    if missing or unexpected:
        raise RuntimeError(f"read-back of {path.name}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.tie_weights()
    return model.eval(), parsed["config"]


def _as(config, model_type: str):
    from transformers import AutoConfig

    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "sliding_window")}
    return AutoConfig.for_model(model_type, **fields)


def config_mismatches(source, read: dict) -> list[str]:
    out = []
    for key in COMPARED_CONFIG:
        want, got = getattr(source, key, None), read.get(key)
        if want is not None and got is not None and not np.isclose(float(want), float(got), rtol=1e-6):
            out.append(f"{key}: file {got} vs model {want}")
    return out


@torch.no_grad()
def check_gguf(path: Path, source, tokenizer, prompts: list[list[dict[str, str]]], kind: str) -> ExportCheck:
    from ..data.pairs import prompt_ids

    back, read = read_back(path, source)
    all_ids = prompt_ids(tokenizer, prompts)
    for model in (source, back):  # the process's first CPU forward can take other kernels (seen: 1e-4 of the
        model(input_ids=torch.tensor([all_ids[0]]))  # largest logit off its later forwards): not the file's doing
    diff, scale, agree, n = 0.0, 0.0, 0.0, 0
    for ids in all_ids:
        x = torch.tensor([ids])
        want, got = source(input_ids=x).logits[0].float(), back(input_ids=x).logits[0].float()
        diff = max(diff, float((want - got).abs().max()))
        scale = max(scale, float(want.abs().max()))
        agree += float((want.argmax(-1) == got.argmax(-1)).sum())
        n += len(ids)
    return ExportCheck(diff, scale, TOLERANCE[kind] * scale, agree / max(n, 1), config_mismatches(source.config, read))


@torch.no_grad()
def llama_cpp_agreement(path: Path, model, tokenizer, prompts) -> tuple[float, bool]:
    """(share of prompt positions where llama.cpp's next token equals the source model's, whether llama.cpp
    tokenized every rendered prompt to the same ids). For the tests and bench/export_demo.py: needs
    llama-cpp-python (orpo[serve])."""
    from llama_cpp import Llama

    from ..data.pairs import prompt_ids

    llm = Llama(model_path=str(path), n_ctx=1024, logits_all=True, verbose=False)
    agree = total = 0
    same_ids = True
    for messages, ids in zip(prompts, prompt_ids(tokenizer, prompts), strict=True):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        same_ids &= llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)]).argmax(-1)
        ours = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).numpy()
        agree += int((theirs == ours).sum())
        total += len(ids)
    return agree / total, same_ids


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


# ---------------------------------------------------------------- Ollama


def modelfile(gguf_name: str, tokenizer) -> str:
    """FROM, TEMPLATE for the chat formats Ollama's Go templates can say exactly (ChatML, Llama 3, Gemma), a
    stop for every end-of-turn token; no sampling parameters."""
    template = tokenizer.chat_template or ""
    stops = sorted({tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)), *[t for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>") if t in template]})
    lines = [f"FROM ./{gguf_name}"]
    if "<|im_start|>" in template:
        body = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')
        system = '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        lines.append(f'TEMPLATE """{system}{body}"""')
    elif "<|start_header_id|>" in template:
        lines.append('TEMPLATE """<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
                     '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
                     '<|start_header_id|>assistant<|end_header_id|>\n\n"""')
    elif "<start_of_turn>" in template:
        lines.append('TEMPLATE """{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
                     '{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command


def source_model(spec: str, overrides: list[str] | tuple[str, ...] = ()):
    """(fp32 model with any adapter folded in, tokenizer, held-out prompts) of a run, merged folder or model."""
    from ..data.pairs import load_pairs, to_messages
    from .merge import PROMPTS, merged_model

    target = resolve(spec, overrides)
    if target.kind == "run" and not (target.final_dir / "adapter_config.json").is_file() and not (target.final_dir / "config.json").is_file():
        raise FileNotFoundError(f"{spec}: final/ holds neither an adapter nor a model")  # a file error, exit 1 as in resolve
    model, tokenizer = merged_model(target)
    problem = supported_problem(model.config)
    if problem:
        raise ExportError(problem)
    prompts: list = []
    try:
        _, _, raw, _ = load_pairs(target.config, tokenizer)
        prompts = [to_messages(raw[i])["prompt"] for i in range(min(3, len(raw or [])))]
    except Exception as exc:  # noqa: BLE001 - a model folder without its data: the fixed prompts
        log.info("held-out prompts unavailable (%s); using fixed prompts", exc)
    if not prompts:
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    return model, tokenizer, prompts


def export_gguf(spec: str, out: str | Path, kind: str = "f16", quantize_to: list[str] | tuple[str, ...] = (),
                with_modelfile: bool = False, force: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Write, check and (optionally) quantize; returns what it measured. Raises ExportError on bad input."""
    out = Path(out)
    if kind not in TYPES:
        raise ExportError(f"--type {kind}: not one of {', '.join(TYPES)} (K-quants: --quantize)")
    bad = [q for q in quantize_to if q.upper() not in K_QUANTS]
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
    model, tokenizer, prompts = source_model(spec, overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"source": spec, "type": kind}
    with atomic_file(out) as tmp:
        write_gguf(model, tokenizer, tmp, kind, name=Path(spec).name or spec)
        result["seconds"] = round(time.perf_counter() - started, 1)
        check = check_gguf(tmp, model, tokenizer, prompts, kind)
        result.update(size_bytes=tmp.stat().st_size, check={**check.__dict__, "passed": check.passed})
        print_check(out, kind, check, result)
        if not check.passed:
            raise CheckFailed(result)
    for q in quantize_to:
        target = quant_path(out, q)
        with atomic_file(target) as tmp:
            quantize(out, tmp, q.upper())
        result.setdefault("quantized", {})[q] = target.stat().st_size
        print(f"{target}: {q.upper()} by llama.cpp, {target.stat().st_size / 2**20:.1f} MiB")
    if with_modelfile:
        with atomic_file(out.with_name("Modelfile")) as tmp:
            tmp.write_text(modelfile(out.name, tokenizer))
        print(f"{out.with_name('Modelfile')}: ollama create NAME -f {out.with_name('Modelfile')}")
    return result


class CheckFailed(RuntimeError):
    def __init__(self, result: dict):
        super().__init__("the GGUF read-back check failed")
        self.result = result


def quant_path(out: Path, name: str) -> Path:
    return out.with_name(f"{out.stem}.{name.upper()}.gguf")


def print_check(out: Path, kind: str, check: ExportCheck, result: dict) -> None:
    verdict = "PASS" if check.passed else "FAIL"
    print(f"{out}: {kind}, {result['size_bytes'] / 2**20:.1f} MiB, written in {result['seconds']} s")
    print(f"read-back check (transformers' GGUF loader) vs the source model: max |logit diff| {check.max_abs_diff:.3e} "
          f"(tolerance {check.tolerance:.3e} = {TOLERANCE[kind]:g} x max |logit| {check.scale:.2f}), "
          f"top-1 agreement {100 * check.top1_agreement:.1f}%: {verdict}")
    for line in check.config_mismatches:
        print(f"  config read back differs: {line}")


def run_export(spec: str, out: str, kind: str, quantize_to: list[str], with_modelfile: bool, force: bool,
               overrides: list[str]) -> int:
    """`orpo export`: exit 0 PASS, 1 FAIL (no file left); raised to the CLI: a missing file or folder (a run without
    final/: FileNotFoundError, exit 1), a Hub failure (HubError, exit 1), bad options (ExportError, exit 2)."""
    try:
        export_gguf(spec, out, kind, quantize_to, with_modelfile, force, overrides)
    except CheckFailed:
        return 1
    return 0
