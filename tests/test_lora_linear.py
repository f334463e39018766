"""The fused LoRA layer: peft's numbers (same dropout masks) for the output and every gradient, peft's own path
wherever the call is not the plain case, and swapped in by training's model loading."""

from __future__ import annotations

import pytest
import torch

from orpo.model.fast.gated_mlp import fuse_gated_mlps
from orpo.model.fast.lora_dropout import fuse_lora_dropout
from orpo.model.fast.lora_linear import FusedLoraLinear, fuse_lora_linears
from test_attention import tiny_model


def lora_model(kind: str, fused: bool, dropout: float = 0.2, dtype=torch.float64, bias: bool = False):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(kind, "sdpa").to(dtype).train()
    if bias:  # a bias on the base layers
        model.config.attention_bias = True
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias = torch.nn.Parameter(torch.randn(layer.self_attn.q_proj.out_features, dtype=dtype), requires_grad=False)
    fuse_gated_mlps(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False))
    fuse_lora_dropout(model)
    if fused:
        assert fuse_lora_linears(model) == 7 * model.config.num_hidden_layers
    return model


def run(model, ids, seed=3):
    torch.manual_seed(seed)  # the same dropout masks
    logits = model(input_ids=ids).logits
    (logits.square().mean() + logits[:, :, 5].sum()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fused_lora_layers_equal_peft(kind, dropout):
    ids = torch.randint(3, 96, (2, 13))
    want, want_grads = run(lora_model(kind, False, dropout), ids)
    got, got_grads = run(lora_model(kind, True, dropout), ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 2 * 7 * 2
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-12, atol=1e-12, msg=name)
        assert grad.abs().max() > 0


def test_a_base_bias_and_fp32_also_match():
    ids = torch.randint(3, 96, (1, 9))
    want, want_grads = run(lora_model("llama", False, 0.1, torch.float32, bias=True), ids)
    got, got_grads = run(lora_model("llama", True, 0.1, torch.float32, bias=True), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_fused_path_runs_and_other_calls_take_peft(monkeypatch):
    import orpo.model.fast.lora_linear as fused_module

    calls = []
    real = fused_module._LoraLinear.apply
    monkeypatch.setattr(fused_module._LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    model = lora_model("llama", True)
    ids = torch.randint(3, 96, (1, 7))
    model(input_ids=ids)
    assert len(calls) == 14
    calls.clear()
    with model.disable_adapter():  # adapters off: the base model, through peft
        base = model(input_ids=ids).logits
    assert not calls
    model.eval()
    with torch.no_grad():
        lora = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: peft's path
            model(input_ids=ids)
    assert len(calls) == 14 and (lora - base).abs().max() > 1e-3
    layer = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    layer.merge()
    calls.clear()
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features, dtype=torch.float64))
    assert not calls


def test_training_loads_models_with_fused_lora_layers(chat_model_dir):
    from orpo.config import load_config
    from orpo.model.load import load_model, load_tokenizer

    config = load_config(None, [f"model.name_or_path={chat_model_dir}", "lora.dropout=0.05"])
    tokenizer, new = load_tokenizer(config)
    model = load_model(config, tokenizer, new)
    assert sum(isinstance(m, FusedLoraLinear) for m in model.modules()) > 0
    assert fuse_lora_linears(model) == 0  # idempotent
