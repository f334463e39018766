"""The check of a written GGUF file, done by the runtime that will read it (llama.cpp), within bounded memory.

Three parts, each of which must pass:

1. Tensors. The file is read back one tensor at a time (plain reads at the offsets its table gives), each
   tensor decoded and compared with the source tensor as it was meant to be written: relative RMS error at
   most TENSOR_ERROR[type] (the type's rounding), names and shapes complete. This proves the bytes; it cannot
   prove the layout (a missing permutation is faithfully written).
2. Metadata. What llama.cpp read from the file (its own accessors: context length, sizes, head counts,
   sliding window, BOS/EOS/end-of-turn ids, add-BOS, chat template) and the keys it reads (rope base and
   scaling, head sizes, window pattern, soft-capping), compared key by key with what the source config and
   tokenizer imply, written out again here from the config rather than from the writer's code.
3. Logits. llama.cpp runs the file on the prompts (the run's held-out prompts or fixed ones, plus, where the
   model has a sliding window or rope scaling with an original context, one prompt longer than that); the
   source model (fp32) runs the same ids; llama.cpp must tokenize every rendered prompt to the same ids.
   The statistics are distributions, not a maximum: the mean next-token KL divergence KL(source || file) over
   all positions (and the mean of the worst prompt), and top-1 agreement, against THRESHOLDS[type].

Memory: the source model runs in fp32 whole when it is small (IN_MEMORY_PARAMS), else layer by layer through
accelerate's offloading hooks, each weight read from the stream when its layer runs; its log-probs are kept,
the model dropped, and only then llama.cpp maps the file.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# Relative RMS error of a tensor read back, by the GGML type it is stored in: f16 and bf16 round to 11 and 8
# significant bits (RMS at most 2^-12/sqrt(3), 2^-9/sqrt(3) of a value); q8_0 rounds to 1/254 of each block of 32's
# largest weight; the K-quants keep 6 to 2 bits per weight. Several times what valid files show (README).
TENSOR_ERROR = {"F32": 1e-7, "F16": 1e-3, "BF16": 6e-3, "Q8_0": 3e-2, "Q6_K": 4e-2, "Q5_K": 8e-2, "Q5_0": 8e-2,
                "Q5_1": 8e-2, "Q4_K": 0.15, "Q4_0": 0.15, "Q4_1": 0.15, "IQ4_NL": 0.15, "Q3_K": 0.3, "Q2_K": 0.5}
# (largest mean KL in nats, largest mean KL of one prompt, smallest top-1 agreement) per type. Set from the valid
# files measured in the README ("What the check accepts": the demo model and its base, a run trained on real
# data, Gemma 3 270M, the tiny models of every architecture), several times the worst of them; a broken layout
# on a real model is near a nat (the demo run without the rotary permutation: 0.95). A K-quant is made by
# llama.cpp from a file of the same layout that has passed (the f16 output, or a temporary f16 beside a checked
# bf16/q8_0 one): its limits catch a failed quantization, not a layout, and allow what 4 bits lose on a small
# model (Gemma 3 270M at Q4_K_M: 0.63 nats, worst prompt 1.6). Q3 and Q2 were not measured: wider again.
_Q5, _Q4, _Q3 = (0.25, 0.5, 0.7), (1.0, 3.0, 0.6), (2.0, 5.0, 0.45)
_K = {"Q6_K": (0.1, 0.2, 0.8), "Q5_K_M": _Q5, "Q5_K_S": _Q5, "Q5_0": _Q5, "Q4_K_M": _Q4, "Q4_K_S": _Q4, "Q4_0": _Q4,
      "Q3_K_L": _Q3, "Q3_K_M": _Q3, "Q3_K_S": _Q3, "Q2_K": (3.0, 8.0, 0.3)}
# Top-1 is a second opinion: near-ties flip under any rounding, so its limits leave room (valid f16: 99.3% and up).
THRESHOLDS = {"f32": (1e-4, 2e-4, 0.9), "f16": (1e-4, 2e-4, 0.9), "bf16": (5e-3, 1e-2, 0.9), "q8_0": (3e-2, 6e-2, 0.85),
              "Q8_0": (3e-2, 6e-2, 0.85), **_K}
IN_MEMORY_PARAMS = 1_000_000_000  # up to 4 GB of fp32 weights: the source model is built whole
CHUNK_BYTES = 64 * 2**20  # rows of a tensor read back at a time
LONG_PROMPT_CAP = 4096  # tokens: a longer window or original context is checked up to here (said in the report)


@dataclass
class GGUFCheck:
    kind: str
    tensor_error: float  # worst relative RMS error of one tensor read back
    kl_mean: float  # nats, over every position of every prompt
    kl_worst_prompt: float  # the largest per-prompt mean
    top1: float  # share of positions where llama.cpp's and the source's most likely next token agree
    positions: int
    prompt_lengths: list[int]
    same_ids: bool  # llama.cpp tokenized every rendered prompt to the source's ids
    problems: list[str] = field(default_factory=list)  # tensors and metadata
    notes: list[str] = field(default_factory=list)
    kl_by_prompt: list[float] = field(default_factory=list)  # each prompt's mean, in prompt order

    @property
    def passed(self) -> bool:
        kl, worst, top1 = THRESHOLDS[self.kind]
        return (not self.problems and self.same_ids and self.kl_mean <= kl and self.kl_worst_prompt <= worst
                and self.top1 >= top1)


# ---------------------------------------------------------------- 1. tensors


def read_back_tensors(path: Path, weights, names: dict[str, str], transform, arch) -> tuple[float, list[str]]:
    """(worst relative RMS error, problems): every tensor of the file decoded and compared with its source."""
    import gguf
    from tqdm.auto import tqdm

    reader = gguf.GGUFReader(path)
    table = {t.name: t for t in reader.tensors}
    problems = [f"tensor {g} is missing from the file" for g in names.values() if g not in table]
    worst = 0.0
    with open(path, "rb") as f:
        for key in tqdm([k for k, g in names.items() if g in table], desc="reading back", unit="tensor", leave=False):
            entry = table[names[key]]
            want = transform(key, weights.get(key), weights.config, arch)
            shape = tuple(int(d) for d in reversed(entry.shape))
            if shape != tuple(want.shape):
                problems.append(f"tensor {entry.name}: shape {shape} in the file, {tuple(want.shape)} in the model")
                continue
            rows = want.reshape(-1, shape[-1])
            row_bytes = entry.n_bytes // rows.shape[0]
            step = max(1, CHUNK_BYTES // max(row_bytes, 1))
            error_sq = norm_sq = 0.0
            f.seek(entry.data_offset)
            for start in range(0, rows.shape[0], step):  # a chunk of rows at a time: one tensor's copy, not three
                part = rows[start:start + step].numpy()
                raw = np.frombuffer(f.read(row_bytes * part.shape[0]), dtype=np.uint8)
                got = decode(raw, entry.tensor_type, part.shape)
                error_sq += float(np.square(got - part, dtype=np.float64).sum())
                norm_sq += float(np.square(part, dtype=np.float64).sum())
            error = (error_sq / max(norm_sq, 1e-60)) ** 0.5
            bound = TENSOR_ERROR.get(entry.tensor_type.name)
            if bound is None or error > bound:
                problems.append(f"tensor {entry.name} ({entry.tensor_type.name}): relative error {error:.2e} read back")
            worst = max(worst, error)
            del want, rows
    return worst, problems


def decode(raw: np.ndarray, kind, shape: tuple[int, ...]) -> np.ndarray:
    import gguf

    qt = gguf.GGMLQuantizationType
    if kind == qt.F32:
        return raw.view(np.float32).reshape(shape)
    if kind == qt.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    return gguf.quants.dequantize(raw.reshape(*shape[:-1], -1), kind).reshape(shape).astype(np.float32)


# ---------------------------------------------------------------- 2. metadata


def expected_metadata(config, tokenizer, arch_name: str) -> dict[str, object]:
    """The GGUF keys a runtime reads, as the source config and tokenizer imply them."""
    from ..data.pairs import bos_to_add, end_of_turn_id
    from .export import rope

    a = arch_name
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    full, sliding = rope(config)
    out: dict[str, object] = {
        f"{a}.context_length": config.max_position_embeddings,
        f"{a}.embedding_length": config.hidden_size,
        f"{a}.block_count": config.num_hidden_layers,
        f"{a}.feed_forward_length": config.intermediate_size,
        f"{a}.attention.head_count": heads,
        f"{a}.attention.head_count_kv": config.num_key_value_heads,
        f"{a}.attention.key_length": head_dim,
        f"{a}.attention.value_length": head_dim,
        f"{a}.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        f"{a}.rope.freq_base": float(full.get("rope_theta", 10000.0)),
        f"{a}.rope.dimension_count": int((full.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", 1.0) or 1.0) * head_dim),
        "tokenizer.ggml.eos_token_id": end_of_turn_id(tokenizer),
        "tokenizer.ggml.eot_token_id": end_of_turn_id(tokenizer),
        "tokenizer.ggml.add_bos_token": bos_to_add(tokenizer) is not None,
        "tokenizer.chat_template": tokenizer.chat_template,
    }
    if tokenizer.bos_token_id is not None:
        out["tokenizer.ggml.bos_token_id"] = tokenizer.bos_token_id
    if sliding and sliding.get("rope_theta") is not None:
        out[f"{a}.rope.freq_base_swa"] = float(sliding["rope_theta"])
    if full.get("rope_type") in ("linear", "yarn"):
        out[f"{a}.rope.scaling.type"] = full["rope_type"]
        out[f"{a}.rope.scaling.factor"] = float(full["factor"])
    layer_types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window and window < config.max_position_embeddings:
        out[f"{a}.attention.sliding_window"] = window  # llama.cpp's Llama graph has none: the check says so
    elif "sliding_attention" in layer_types or a == "gemma2":
        out[f"{a}.attention.sliding_window"] = config.sliding_window
        if a.startswith("gemma") and layer_types:
            out[f"{a}.attention.sliding_window_pattern"] = [t == "sliding_attention" for t in layer_types]
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None):
            out[f"{a}.{key}"] = float(getattr(config, key))
    return out


def file_metadata(path: Path) -> dict[str, object]:
    """Every key of the file's header, as Python values (strings, numbers, lists)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            continue
        out[key] = f.contents()
    return out


def metadata_problems(expected: dict[str, object], found: dict[str, object]) -> list[str]:
    out = []
    for key, want in expected.items():
        if key not in found:
            out.append(f"metadata {key}: absent (expected {_short(want)})")
            continue
        got = found[key]
        if isinstance(want, bool) or isinstance(want, str) or isinstance(want, list):
            same = got == want
        else:
            same = got is not None and np.isclose(float(got), float(want), rtol=1e-6)
        if not same:
            out.append(f"metadata {key}: {_short(got)} in the file, {_short(want)} from the model")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def runtime_problems(llm, expected: dict[str, object], arch_name: str) -> list[str]:
    """What llama.cpp itself understood from the file, against `expected`."""
    import llama_cpp

    model, vocab = llm.model, llama_cpp.llama_model_get_vocab(llm.model)
    a = arch_name
    window = expected.get(f"{a}.attention.sliding_window") or 0
    pairs = {
        "context length": (llama_cpp.llama_model_n_ctx_train(model), expected[f"{a}.context_length"]),
        "embedding size": (llama_cpp.llama_model_n_embd(model), expected[f"{a}.embedding_length"]),
        "layers": (llama_cpp.llama_model_n_layer(model), expected[f"{a}.block_count"]),
        "heads": (llama_cpp.llama_model_n_head(model), expected[f"{a}.attention.head_count"]),
        "key/value heads": (llama_cpp.llama_model_n_head_kv(model), expected[f"{a}.attention.head_count_kv"]),
        "sliding window": (llama_cpp.llama_model_n_swa(model), window),
        "end-of-turn id": (llama_cpp.llama_vocab_eot(vocab), expected["tokenizer.ggml.eot_token_id"]),
        "end-of-generation id": (llama_cpp.llama_vocab_eos(vocab), expected["tokenizer.ggml.eos_token_id"]),
        "adds BOS": (bool(llama_cpp.llama_vocab_get_add_bos(vocab)), expected["tokenizer.ggml.add_bos_token"]),
    }
    if "tokenizer.ggml.bos_token_id" in expected:
        pairs["BOS id"] = (llama_cpp.llama_vocab_bos(vocab), expected["tokenizer.ggml.bos_token_id"])
    template = llama_cpp.llama_model_chat_template(model, None)
    pairs["chat template"] = ((template or b"").decode(), expected["tokenizer.chat_template"])
    return [f"llama.cpp reads {what}: {_short(got)}, the model has {_short(want)}"
            for what, (got, want) in pairs.items() if got != want]


# ---------------------------------------------------------------- 3. logits


def long_prompt_length(config) -> int | None:
    """Tokens a prompt needs to cross the sliding window or the original rope context, where the model has one."""
    from .export import rope

    needs = []
    layer_types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if window and ("sliding_attention" in layer_types or config.model_type in ("gemma2", "mistral")):
        needs.append(int(window))
    full, _ = rope(config)
    if full.get("original_max_position_embeddings") and full.get("rope_type") not in (None, "default"):
        needs.append(int(full["original_max_position_embeddings"]))
    return max(needs) + 32 if needs else None


def long_prompt(tokenizer, tokens: int) -> list[dict[str, str]]:
    """A user message of at least `tokens` tokens once rendered: numbered sentences, no two alike."""
    from ..data.pairs import prompt_ids

    words = ("river", "stone", "lamp", "garden", "window", "letter", "bridge", "cloud", "market", "violin", "harbour")
    n = max(8, tokens // 12)
    while True:
        text = " ".join(f"Note {i}: the {words[i % len(words)]} by the {words[(i * 7 + 3) % len(words)]} counts {i * 37 % 101}." for i in range(n))
        messages = [{"role": "user", "content": f"Read these notes, then say which number came last.\n{text}"}]
        if len(prompt_ids(tokenizer, [messages])[0]) >= tokens:
            return messages
        n = int(n * 1.5) + 1


def reference_model(weights):
    """The source model in fp32 for the check: the loaded one, built whole from the stream when small, or with
    every weight read from the stream when its layer runs (accelerate's offloading hooks)."""
    from accelerate import cpu_offload, init_empty_weights
    from transformers import AutoModelForCausalLM

    if getattr(weights, "model", None) is not None:
        return weights.model.float().eval()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(weights.config, dtype=torch.float32)
    if weights.n_params <= IN_MEMORY_PARAMS:
        model.load_state_dict({k: weights.get(k) for k in weights.names()}, strict=False, assign=True)
        model.tie_weights()
        return model.eval()
    return cpu_offload(model.eval(), execution_device=torch.device("cpu"), state_dict=weights.as_mapping())


@torch.no_grad()
def reference_logprobs(model, ids_list: list[list[int]], batched: bool = False) -> list[np.ndarray]:
    """(T, V) next-token log-probs of each prompt, fp32. `batched`: all prompts in one right-padded forward (an
    offloaded model then reads its weights once, not once per prompt)."""
    if batched:
        width = max(len(ids) for ids in ids_list)
        x = torch.zeros((len(ids_list), width), dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, ids in enumerate(ids_list):
            x[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), 1
        logits = model(input_ids=x, attention_mask=mask).logits.float()
        return [torch.log_softmax(logits[i, : len(ids)], -1).numpy() for i, ids in enumerate(ids_list)]
    model(input_ids=torch.tensor([ids_list[0][:8]]))  # the first CPU forward can take other kernels: not scored
    return [torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1).numpy() for ids in ids_list]


def llama_cpp_logprobs(llm, ids_list: list[list[int]]) -> list[np.ndarray]:
    out = []
    for ids in ids_list:
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        out.append(torch.log_softmax(logits, -1).numpy())
    return out


def kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(ref || got) in nats, and whether the most likely tokens agree."""
    n = min(ref.shape[-1], got.shape[-1])
    p = np.exp(ref)
    kl = (p[:, :n] * (ref[:, :n] - got[:, :n])).sum(-1)
    return np.maximum(kl, 0.0), ref.argmax(-1) == got.argmax(-1)


@dataclass
class Reference:
    """The check's prompts and the source model's log-probs on them, computed once per export."""

    prompts: list[list[dict[str, str]]]
    texts: list[str]  # rendered with the chat template
    ids: list[list[int]]  # as training tokenizes them
    logprobs: list[np.ndarray]  # (T, V) per prompt
    notes: list[str]


def reference(weights, tokenizer, prompts: list[list[dict[str, str]]]) -> Reference:
    """Run the source model (fp32) on the prompts, plus a long one where the model has a window or rope scaling."""
    from ..data.pairs import prompt_ids

    prompts, notes = list(prompts), []
    need = long_prompt_length(weights.config)
    if need:
        if need > LONG_PROMPT_CAP:
            notes.append(f"the long prompt is {LONG_PROMPT_CAP} tokens, short of the {need} that would cross the model's "
                         "window or original context (a CPU check)")
        prompts.append(long_prompt(tokenizer, min(need, LONG_PROMPT_CAP)))
    ids = prompt_ids(tokenizer, prompts)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    model = reference_model(weights)
    logprobs = reference_logprobs(model, ids, batched=weights.n_params > IN_MEMORY_PARAMS)
    del model
    gc.collect()
    return Reference(prompts, texts, ids, logprobs, notes)


def check_file(path: Path, weights, tokenizer, ref: Reference, kind: str, names: dict[str, str], transform, arch) -> GGUFCheck:
    """The three parts of the check (module docstring) of the file at `path`, written as `kind`."""
    from llama_cpp import Llama

    from ..data.pairs import bos_to_add

    config = weights.config
    arch_name = _arch_name(arch)
    tensor_error, problems = read_back_tensors(path, weights, names, transform, arch)
    expected = expected_metadata(config, tokenizer, arch_name)
    problems += metadata_problems(expected, file_metadata(path))
    llm = Llama(model_path=str(path), n_ctx=max(len(i) for i in ref.ids) + 8, n_batch=512, logits_all=True,
                verbose=False, n_threads=os.cpu_count() or 1)
    try:
        problems += runtime_problems(llm, expected, arch_name)
        same = True
        add_bos = bos_to_add(tokenizer) is not None
        for text, ids in zip(ref.texts, ref.ids, strict=True):
            theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
            if add_bos and theirs[:1] != [llm.token_bos()]:
                theirs = [llm.token_bos(), *theirs]
            same &= theirs == ids
        got = llama_cpp_logprobs(llm, ref.ids)
    finally:
        llm.close()
    kls, agree = zip(*(kl_top1(r, g) for r, g in zip(ref.logprobs, got, strict=True)), strict=True)
    all_kl, all_agree = np.concatenate(kls), np.concatenate(agree)
    by_prompt = [float(k.mean()) for k in kls]
    return GGUFCheck(kind, tensor_error, float(all_kl.mean()), max(by_prompt), float(all_agree.mean()), int(all_kl.size),
                     [len(i) for i in ref.ids], bool(same), problems, list(ref.notes), by_prompt)


def limits(kind: str) -> tuple[float, float, float]:
    """(mean KL, worst prompt's mean KL, top-1 agreement) a file of `kind` must meet."""
    return THRESHOLDS[kind]


def _arch_name(arch) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.name)]
