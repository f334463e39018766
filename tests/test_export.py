"""`orpo export`: GGUF files written for every supported architecture, run by llama.cpp and compared with the
source model's next-token distributions (f32, f16, bf16, q8_0 and a K-quant); broken files fail; the metadata;
the refusals and atomic outputs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from conftest import make_tokenizer, tiny_overrides
from orpo.after import export
from orpo.cli import main

PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Add 2 and 3."}]]
# (model type, config fields): tied and untied output, grouped-query attention (4 heads, 2 key/value heads
# everywhere), biases (Qwen2), q/k norms (Qwen3, Gemma 3), sliding windows (Mistral, Gemma 2/3), soft-capping
# (Gemma 2), fused q/k/v and gate/up (Phi-3), rope bases per layer type (Gemma 3), Llama 3.1's rope scaling.
ARCHES = {
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama": ("llama", {"tie_word_embeddings": False}),
    "llama3.1-rope": ("llama", {"tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "mistral": ("mistral", {"sliding_window": None, "tie_word_embeddings": False}),
    "mistral-window": ("mistral", {"sliding_window": 16, "tie_word_embeddings": False}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 16, "tie_word_embeddings": False}),
    "gemma2": ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16, "final_logit_softcapping": 30.0,
                          "attn_logit_softcapping": 50.0}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                               "layer_types": ["sliding_attention", "full_attention"],
                               "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}),
    "phi3": ("phi3", {"tie_word_embeddings": False}),
}


QK_SCALE = 4.0


def tiny(model_type: str, fields: dict, seed: int = 0, hidden: int = 64):
    """A 2-layer model of `model_type` (hidden 64, 4 heads, 2 key/value heads) with the tiny ChatML tokenizer, built
    so that a wrong file shows in its next-token distributions: every weight random, norms included; attention
    peaked (q and k scaled), so that a token's position and its neighbours matter; logits with a spread of
    about 2.5 (final norm scaled), so that the distributions are neither flat nor one-hot (tied embeddings small:
    at N(0, 1) the residual stream is the input token, and the output predicts it whatever attention did)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer(chat=True)
    fields = {"vocab_size": len(tokenizer), **fields}
    config = AutoConfig.for_model(
        model_type, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gemma = model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms start at 1 (or 0, Gemma) and biases at 0: make each one count
                p.add_(torch.randn_like(p) * 0.2)
            elif "embed" in name and model.config.tie_word_embeddings:  # small, or the output is the input token
                p.normal_(0, 0.03)
            elif "embed" in name or "lm_head" in name:
                p.normal_(0, 1.0)
            elif "q_proj" in name or "k_proj" in name:
                p.mul_(QK_SCALE)
            elif "qkv_proj" in name:  # Phi-3: q and k are the first rows
                p[: p.shape[0] - hidden // 2].mul_(QK_SCALE)
            elif "o_proj" in name:  # attention, not the MLP, carries the residual stream
                p.mul_(3.0)
            elif "down_proj" in name:
                p.mul_(0.3)
        ids = torch.tensor([tokenizer("The capital of France is Paris. Waves fold into foam.")["input_ids"]])
        spread = float(model(input_ids=ids).logits.std())
        norm = model.model.norm.weight
        if gemma:
            norm.copy_((1 + norm) * 2.5 / spread - 1)
        else:
            norm.mul_(2.5 / spread)
    return model, tokenizer


def write_and_check(weights, tokenizer, reference, path, kind: str, transform=export.to_gguf):
    """Write `weights` to `path` as `kind` (a K-quant: from an f16 file beside it, by llama.cpp) and check the file
    as `orpo export` does, against the source's log-probs in `reference`."""
    from orpo.after import gguf_check

    arch = export.ARCHES[weights.config.model_type]
    if kind in export.K_QUANTS:
        source = path.with_name(f"{path.stem}.f16.gguf")
        export.write_gguf(weights, tokenizer, source, "f16", "tiny", transform)
        export.quantize(source, path, kind)
    else:
        export.write_gguf(weights, tokenizer, path, kind, "tiny", transform)
    return gguf_check.check_file(path, weights, tokenizer, reference, kind, export.tensor_names(weights, arch), transform, arch)


def export_tiny(model, tokenizer, path, kind: str, transform=export.to_gguf, prompts=PROMPTS):
    """Write `model` to `path` as `kind` and check the file as `orpo export` does."""
    from orpo.after import gguf_check
    from orpo.after.weights import InMemory

    weights = InMemory(model)
    return write_and_check(weights, tokenizer, gguf_check.reference(weights, tokenizer, prompts), path, kind, transform)


def summary(check) -> str:
    return (f"KL {check.kl_mean:.2e} (worst prompt {check.kl_worst_prompt:.2e}), top-1 {check.top1:.3f}, tensors {check.tensor_error:.1e}, "
            f"prompts {check.prompt_lengths}, problems {check.problems[:2]}")


VALID = [a for a in ARCHES if a != "mistral-window"]


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", VALID)
def test_every_architecture_runs_in_llama_cpp_like_the_source(tmp_path, arch, kind):
    """llama.cpp runs each architecture's file and its next-token distributions match transformers' (a long prompt
    crosses the sliding window or the original rope context where the model has one)."""
    model, tokenizer = tiny(*ARCHES[arch])
    check = export_tiny(model, tokenizer, tmp_path / "m.gguf", kind)
    print(f"{arch} {kind}: {summary(check)}")
    assert check.passed and check.same_ids, summary(check)
    if kind == "f32":
        assert check.kl_mean < 1e-6 and check.top1 == 1.0 and check.tensor_error == 0.0


@pytest.mark.parametrize("arch", VALID)
def test_a_k_quant_made_from_f16_is_checked_like_the_rest(tmp_path, arch):
    """Rows of 256 (hidden 256), so that llama.cpp's K-quant blocks apply and the file holds Q4_K and Q6_K tensors."""
    import gguf

    model, tokenizer = tiny(*ARCHES[arch], hidden=256)
    check = export_tiny(model, tokenizer, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M")
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.Q4_K_M.gguf").tensors}
    print(f"{arch} Q4_K_M ({sorted(kinds)}): {summary(check)}")
    assert "Q4_K" in kinds and check.passed, summary(check)


def without_permutation(name, w, config, arch):
    return export.to_gguf(name, w, config, dataclasses.replace(arch, permute_qk=False))


def without_norm_shift(name, w, config, arch):
    return export.to_gguf(name, w, config, dataclasses.replace(arch, norm_shift=0.0))


def transposed_projection(name, w, config, arch):
    w = export.to_gguf(name, w, config, arch)
    return w.T.contiguous() if name.endswith("layers.0.self_attn.o_proj.weight") else w


# Broken files the check must fail. On these tiny random models a wrong layout moves the distributions by
# about 1e-4 to 1e-2 nats, as much as q8_0's rounding does: they are checked where they stand out (f32, f16);
# the demo model fails them at every type (tests/test_llama_cpp.py). A wrong norm shift or rope base fails everywhere.
BROKEN = [("llama", without_permutation, ("f32", "f16")), ("mistral", without_permutation, ("f32", "f16")),
          ("llama", transposed_projection, ("f32", "f16")), ("qwen3", transposed_projection, ("f32", "f16")),
          ("phi3", transposed_projection, ("f32", "f16", "bf16")),
          ("gemma2", without_norm_shift, ("f32", "f16", "bf16", "q8_0")), ("gemma3", without_norm_shift, ("f32", "f16", "bf16", "q8_0"))]


@pytest.mark.parametrize("arch,transform,kind", [(a, t, k) for a, t, kinds in BROKEN for k in kinds],
                         ids=[f"{a}-{t.__name__}-{k}" for a, t, kinds in BROKEN for k in kinds])
def test_a_broken_file_fails(tmp_path, arch, transform, kind):
    model, tokenizer = tiny(*ARCHES[arch])
    check = export_tiny(model, tokenizer, tmp_path / "m.gguf", kind, transform)
    print(f"{arch} {transform.__name__} {kind}: {summary(check)}")
    assert not check.passed and not check.problems  # the bytes are as written: only llama.cpp's logits can tell


def test_a_k_quant_of_a_broken_file_fails(tmp_path):
    """The K-quants' limits allow what 4 bits lose; a file whose layout is wrong is still far outside them."""
    from orpo.after import gguf_check

    model, tokenizer = tiny(*ARCHES["gemma3"], hidden=256)
    check = export_tiny(model, tokenizer, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M", without_norm_shift)
    assert not check.passed and check.kl_mean > gguf_check.limits("Q4_K_M")[0], summary(check)


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_a_wrong_rope_base_fails_at_every_type(tmp_path, monkeypatch, kind):
    import gguf

    real = gguf.GGUFWriter.add_rope_freq_base
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_freq_base", lambda self, value: real(self, 2 * value))
    model, tokenizer = tiny(*ARCHES["llama"])
    check = export_tiny(model, tokenizer, tmp_path / "m.gguf", kind)
    assert not check.passed and any("rope.freq_base" in p for p in check.problems), summary(check)


def test_mistral_with_a_sliding_window_fails(tmp_path):
    """llama.cpp runs Mistral with its Llama graph, which has no sliding window: past the window the outputs
    differ, and the check says why."""
    model, tokenizer = tiny(*ARCHES["mistral-window"])
    check = export_tiny(model, tokenizer, tmp_path / "m.gguf", "f32")
    print(summary(check))
    assert not check.passed and any("sliding window" in p for p in check.problems)


def test_metadata_a_runtime_needs(tmp_path):
    import gguf

    from orpo.after.weights import InMemory

    model, tokenizer = tiny(*ARCHES["gemma2"])
    path = tmp_path / "m.gguf"
    export.write_gguf(InMemory(model), tokenizer, path, "f16", "g")
    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        value = f.contents()
        return value

    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field("general.architecture") == "gemma2"
    assert field("gemma2.attention.head_count") == 4 and field("gemma2.attention.head_count_kv") == 2
    assert field("gemma2.attention.key_length") == 16 and field("gemma2.attention.sliding_window") == 16
    assert field("gemma2.final_logit_softcapping") == pytest.approx(30.0)
    assert list(field("gemma2.attention.sliding_window_pattern")) == [t == "sliding_attention" for t in model.config.layer_types]
    assert field("tokenizer.ggml.eos_token_id") == eot and field("tokenizer.ggml.eot_token_id") == eot
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    types = field("tokenizer.ggml.token_type")
    assert types[eot] == gguf.TokenType.CONTROL and types[tokenizer.convert_tokens_to_ids("a")] == gguf.TokenType.NORMAL
    assert "output.weight" not in {t.name for t in reader.tensors}  # Gemma: always the embeddings
    norms = [t for t in reader.tensors if t.name.endswith("norm.weight")]
    assert norms and all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in norms)


def sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer.json: BPE with byte fallback, "▁" for spaces, <0xNN> byte tokens, ChatML."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CHATML, CORPUS

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<unk>")
    fast.chat_template = CHATML
    return fast


def test_a_sentencepiece_style_tokenizer(tmp_path):
    """Llama 2 / Mistral / Gemma / Phi-3 tokenizers: tokenizer.ggml.model 'llama' with scores and byte tokens; the
    model reads back, and llama.cpp tokenizes chat text to transformers' ids."""
    import gguf

    tokenizer = sentencepiece_style_tokenizer()
    model, _ = tiny("llama", {"tie_word_embeddings": False, "vocab_size": len(tokenizer) + 3})  # 3 padding rows
    path = tmp_path / "m.gguf"
    check = export_tiny(model, tokenizer, path, "f16")
    assert check.passed, summary(check)
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama" and reader.fields["tokenizer.ggml.add_space_prefix"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(types) == len(tokenizer) + 3 and len(reader.fields["tokenizer.ggml.scores"].contents()) == len(types)
    assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in ["Hello there! How are you today?", "The answer is 5. Grüße, 東京", "  two  spaces"]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == tokenizer(rendered, add_special_tokens=False)["input_ids"], text


def test_pre_tokenizers_by_structure():
    assert export.pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smol = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}
    assert export.pre_tokenizer({"pre_tokenizer": smol}) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": export.LLAMA3_SPLIT}}, {"type": "ByteLevel", "use_regex": False}]}
    assert export.pre_tokenizer({"pre_tokenizer": llama3}) == "llama-bpe"
    with pytest.raises(export.ExportError, match="pre-tokenizer"):
        export.pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})


def test_modelfile_for_chatml_llama3_and_others():
    tokenizer = make_tokenizer(chat=True)
    from orpo.after.modelfile import modelfile

    text = modelfile("m.gguf", tokenizer)
    assert text.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text and "TEMPLATE" in text
    assert "temperature" not in text and "top_p" not in text
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]<|im_end|>{% endfor %}"  # unknown format
    assert 'TEMPLATE """' not in modelfile("m.gguf", tokenizer)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, chat_model_dir):
    """A finished LoRA run on the tiny chat model (hidden 32: q8_0 rows fall back to f16)."""
    from conftest import PAIRS, write_jsonl

    root = tmp_path_factory.mktemp("export_run")
    data = write_jsonl(root / "pairs.jsonl", PAIRS * 4)
    out = root / "run"
    assert main(["train", *tiny_overrides(chat_model_dir, data, out, max_steps=2, eval_steps="null")]) == 0
    return out


def test_export_a_run_with_modelfile_refuses_existing_outputs(tiny_run, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_run), "--gguf", str(out), "--type", "q8_0", "--modelfile"]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed and "llama.cpp vs the source model" in printed and out.is_file() and (tmp_path / "Modelfile").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]  # nothing partial left
    assert main(["export", str(tiny_run), "--gguf", str(out)]) == 2
    assert "exists (add --force" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--gguf", str(out), "--force"]) == 0


def test_a_failed_check_leaves_no_file(tiny_run, tmp_path, monkeypatch, capsys):
    from orpo.after import gguf_check

    monkeypatch.setitem(gguf_check.THRESHOLDS, "f16", (0.0, 0.0, 1.0))
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_run), "--gguf", str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out and list(tmp_path.iterdir()) == []


def test_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    other = tmp_path / "olmo"
    config = AutoConfig.for_model("olmo2", vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    make_tokenizer(chat=True).save_pretrained(other)
    gemma3 = tmp_path / "gemma3"
    gemma3.mkdir()
    (gemma3 / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"},
                                                    "vision_config": {"model_type": "siglip_vision_model"}}))
    cases = [
        ([str(half), "--gguf", str(tmp_path / "a.gguf")], "did the run finish"),
        ([str(gemma3), "--gguf", str(tmp_path / "e.gguf")], "export its text model instead"),
        ([str(other), "--gguf", str(tmp_path / "b.gguf")], "supported: gemma2, gemma3_text, llama"),
        ([str(tiny_run), "--gguf", str(tmp_path / "c.bin")], "must end in .gguf"),
        ([str(tiny_run), "--gguf", str(tmp_path / "d.gguf"), "--quantize", "Q9_X"], "not one of"),
    ]
    for argv, words in cases:
        assert main(["export", *argv]) in (1, 2)
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3", "half", "olmo"]
    unknown = subprocess.run([sys.executable, "-m", "orpo.cli", "export", str(tiny_run), "--gguf", "x.gguf", "--type", "q3"],
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "invalid choice: 'q3'" in unknown.stderr


def test_a_run_on_a_gguf_base_merges(tmp_path, capsys):
    """The README offers model.gguf_file; such a run's base is GGUF-loaded, which transformers refuses to save.
    Merging (and so exporting) it works, and so does full fine-tuning's final/: the dequantized weights are plain.
    The base: a tiny Llama written to GGUF by export itself (the embedded SmolLM2 GGUF takes minutes here)."""
    from conftest import PAIRS, write_jsonl
    from orpo.after.weights import InMemory

    model, tokenizer = tiny(*ARCHES["llama"])
    base = tmp_path / "base"
    base.mkdir()
    export.write_gguf(InMemory(model), tokenizer, base / "tiny.f32.gguf", "f32", "tiny")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    run = tmp_path / "run"
    items = [f"model.name_or_path={base}", "model.gguf_file=tiny.f32.gguf", f"data.path={pairs}", f"output_dir={run}",
             "max_steps=1", "max_length=48", "max_prompt_length=24", "per_device_train_batch_size=1", "gradient_accumulation_steps=1",
             "data.test_size=2", "eval_steps=null", "eval_on_start=false", "lora.r=2", "lora.alpha=4"]
    assert main(["train", *items]) == 0
    assert main(["merge", str(run), "--dtype", "bf16", "--out", str(tmp_path / "merged")]) == 0
    assert "PASS" in capsys.readouterr().out
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    result = export.export_gguf(str(run), tmp_path / "run.gguf", "f16")  # not streamable: the whole model, in fp32
    assert not result["streamed"] and result["files"]["f16"]["check"]["passed"]
    full = tmp_path / "full"  # full fine-tuning on that base saves final/ with the same call
    items = [i.replace(f"output_dir={run}", f"output_dir={full}") for i in items] + ["lora.enabled=false"]
    assert main(["train", *items]) == 0 and (full / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_large_model_runs_layer_by_layer_from_the_stream(tmp_path, monkeypatch, arch):
    """Above IN_MEMORY_PARAMS the check's source model is never whole: accelerate's hooks read each weight from the
    stream when its layer runs, all prompts in one padded batch. Its log-probs equal the whole model's."""
    import numpy as np

    from orpo.after import gguf_check
    from orpo.after.weights import InMemory, folder_weights
    from orpo.data.pairs import prompt_ids

    model, tokenizer = tiny(*ARCHES[arch])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    streamed = folder_weights(tmp_path, tokenizer, [])
    ids = prompt_ids(tokenizer, PROMPTS)
    whole = gguf_check.reference_logprobs(InMemory(model).model, ids)
    monkeypatch.setattr(gguf_check, "IN_MEMORY_PARAMS", 0)
    offloaded = gguf_check.reference_model(streamed)
    assert not any(p.device.type == "cpu" for p in offloaded.parameters())  # on the meta device between forwards
    layered = gguf_check.reference_logprobs(offloaded, ids, batched=True)
    assert max(float(np.abs(a - b).max()) for a, b in zip(whole, layered, strict=True)) < 1e-4


def test_an_adapter_run_is_streamed(tiny_run, tmp_path):
    result = export.export_gguf(str(tiny_run), tmp_path / "m.gguf", "f16")
    assert result["streamed"] and result["files"]["f16"]["check"]["passed"]


def test_a_k_quant_from_a_q8_0_export_goes_through_a_temporary_f16(tiny_run, tmp_path):
    """llama.cpp will not requantize q8_0 or bf16: the K-quant is made from a temporary f16 file, checked, and the
    temporary file is gone."""
    result = export.export_gguf(str(tiny_run), tmp_path / "m.gguf", "q8_0", ["Q4_K_M"])
    assert sorted(result["files"]) == ["Q4_K_M", "q8_0"] and all(f["check"]["passed"] for f in result["files"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Q4_K_M.gguf", "m.gguf"]


def test_the_check_prompts_are_read_without_tokenizing_the_data(tiny_run, monkeypatch):
    """Export needs three held-out prompts, not the tokenized training set, and never the network for them."""
    from conftest import PAIRS
    from orpo.after.merge import PROMPTS
    from orpo.after.runs import resolve
    from orpo.data import pairs
    from orpo.model.load import load_tokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("the data was tokenized")

    monkeypatch.setattr(pairs, "tokenize_rows", refuse)
    target = resolve(str(tiny_run))
    tokenizer, _ = load_tokenizer(target.config)
    prompts = export.check_prompts(target.config, tokenizer)
    held_out = {p["prompt"] for p in PAIRS}
    assert len(prompts) == 3 and all(p[-1]["role"] == "user" and p[-1]["content"] in held_out for p in prompts)
    elsewhere = target.config.model_copy(update={"data": target.config.data.model_copy(update={"path": "someone/dataset"})})
    assert [p[0]["content"] for p in export.check_prompts(elsewhere, tokenizer)] == PROMPTS  # a Hub id: not fetched
