"""The fused gated MLP: bitwise the model's own forward and gradients on every model type that has the
expression, a quarter less kept for backward, and swapped in by training's model loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orpo.model.fast.gated_mlp import GatedProduct, fuse_gated_mlps
from orpo.model.fast.lora_dropout import fuse_lora_dropout
from test_attention import tiny_model


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn` runs (parameters excluded)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma"])
def test_fused_mlps_give_the_same_bits(kind, lora):
    """Same logits and the same gradient for every trained weight, to the bit (gemma: another activation);
    with LoRA and its fused dropout, down_proj's adapter rebuilds the product instead of keeping it."""
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 96, (2, 11))
    results = []
    for fuse in (False, True):
        model = tiny_model(kind, "sdpa").train()
        if fuse:
            assert fuse_gated_mlps(model) == model.config.num_hidden_layers
            assert all(type(layer.mlp).forward.__name__ == "_fused_forward" for layer in model.model.layers)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear", init_lora_weights=False))
            assert fuse_lora_dropout(model) == 7 * model.config.num_hidden_layers
        torch.manual_seed(3)  # the same dropout masks
        logits = model(input_ids=ids).logits
        (logits.square().mean() + logits[:, :, 5].sum()).backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(got, want)
    assert len(got_grads) == len(want_grads) and all(torch.equal(g, w) for g, w in zip(got_grads, want_grads, strict=True))


def test_the_product_keeps_gate_and_up_only():
    gate = torch.randn(64, 48, requires_grad=True)
    up = torch.randn(64, 48, requires_grad=True)
    act = nn.SiLU()
    plain = saved_bytes(lambda: act(gate) * up)
    fused = saved_bytes(lambda: GatedProduct.apply(gate, up, act, {}))
    assert plain == 3 * gate.numel() * 4 and fused == 2 * gate.numel() * 4
    grad = torch.randn(64, 48)
    want = torch.autograd.grad(act(gate) * up, [gate, up], grad)
    got = torch.autograd.grad(GatedProduct.apply(gate, up, act, {}), [gate, up], grad)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_mlps_with_another_expression_are_left_alone():
    class Other(nn.Module):  # has the parts, but its forward is not the gated product
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4), nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    model = nn.Sequential(Other())
    assert fuse_gated_mlps(model) == 0 and type(model[0]) is Other


def test_training_loads_models_with_fused_mlps(chat_model_dir):
    from orpo.config import load_config
    from orpo.model.load import load_model, load_tokenizer

    config = load_config(None, [f"model.name_or_path={chat_model_dir}", "lora.dropout=0.05"])
    tokenizer, new = load_tokenizer(config)
    model = load_model(config, tokenizer, new)
    mlps = [m for m in model.modules() if type(m).forward.__name__ == "_fused_forward"]
    assert len(mlps) == model.config.num_hidden_layers
    assert fuse_gated_mlps(model) == 0  # idempotent


def test_a_lora_step_keeps_half_the_mlp_activations():
    """With LoRA on down_proj, the MLP keeps gate and up (plus one bit of mask per adapter input element) where it kept
    gate, act(gate), up and the product."""
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 96, (2, 11))
    kept = []
    for fuse in (False, True):
        model = tiny_model("llama", "sdpa").train()
        if fuse:
            fuse_gated_mlps(model)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["gate_proj", "up_proj", "down_proj"]))
        fuse_lora_dropout(model)
        kept.append(saved_bytes(lambda m=model: m(input_ids=ids)))
    wide = 2 * 11 * model.config.intermediate_size * 4 * model.config.num_hidden_layers  # one fp32 (tokens, I) per layer
    assert kept[0] - kept[1] == 2 * wide
