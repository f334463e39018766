"""The fused RMSNorm: the model's own forward to the bit, its gradients to float rounding on every model type with
Llama's norm, other norms left alone, less kept for a trained weight, and swapped in by training's model loading."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from orpo.model.fast.gated_mlp import REBUILD
from orpo.model.fast.rms_norm import fuse_rms_norms
from test_attention import tiny_model
from test_gated_mlp import saved_bytes


def llama_norm(hidden: int, seed: int = 0):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(seed)
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    norm.weight.data = torch.randn(hidden)  # not the ones of a fresh norm: the weight's gradient path matters
    return norm


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_fused_norms_match_the_models_own(kind):
    """Whole tiny models, full fine-tuning: the same logits to the bit, every gradient (norm weights included)
    within 1e-5 relative of autograd through the model's code."""
    ids = torch.randint(3, 96, (2, 11))
    results = []
    for fuse in (False, True):
        model = tiny_model(kind, "sdpa").train()
        norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())  # qwen3: + q and k norms
        if fuse:
            assert fuse_rms_norms(model) == norms >= 2 * model.config.num_hidden_layers + 1
        logits = model(input_ids=ids).logits
        (logits.square().mean() + logits[:, :, 5].sum()).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(got, want)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("weight_trained", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_norm_equals_autograd_through_its_code(dtype, weight_trained):
    """Odd shape, inputs of very different scales; bf16 input with an fp32 weight as 4-bit training has it."""
    norm = llama_norm(24)
    norm.weight.requires_grad_(weight_trained)
    fused = copy.deepcopy(norm)
    assert fuse_rms_norms(fused) == 1
    x = (torch.randn(3, 7, 24) * torch.logspace(-2, 2, 7)[:, None]).to(dtype)
    grad = torch.randn(3, 7, 24)
    outs = []
    for module in (norm, fused):
        leaf = x.clone().requires_grad_()
        y = module(leaf)
        y.backward(grad.to(y.dtype))
        outs.append((y.detach(), leaf.grad, module.weight.grad))
    (want, want_dx, want_dw), (got, got_dx, got_dw) = outs
    assert got.dtype == want.dtype and torch.equal(got, want)
    if dtype == torch.float32:
        assert_close(got_dx, want_dx, rtol=1e-5, atol=1e-6)
    else:  # the model's code rounds d loss / d (x r) to bf16 before the norm's backward; the fused one does not
        leaf = x.double().requires_grad_()
        w = norm.weight.detach().double()
        y = w * leaf * torch.rsqrt(leaf.pow(2).mean(-1, keepdim=True) + 1e-5)
        (ref,) = torch.autograd.grad(y, leaf, grad.double())
        err_got, err_want = (got_dx.double() - ref).abs().max(), (want_dx.double() - ref).abs().max()
        assert err_got <= err_want and err_got <= 2 ** -8 * ref.abs().max()
    if weight_trained:
        assert_close(got_dw, want_dw, rtol=1e-5, atol=1e-5)
    else:
        assert got_dw is None and want_dw is None


def test_a_trained_weight_keeps_the_input_only():
    """With the weight trained (full fine-tuning), autograd through the model's code keeps the input and the
    normalised input; the fused norm keeps the input and one value per token (and the weight, as both do)."""
    norm = llama_norm(64)
    fused = copy.deepcopy(norm)
    fuse_rms_norms(fused)
    x = torch.randn(50, 64, requires_grad=True)
    plain, kept = saved_bytes(lambda: norm(x)), saved_bytes(lambda: fused(x))
    assert kept == (x.numel() + 50 + 64) * 4  # x (shared with the caller), r and the weight
    assert plain - kept >= x.numel() * 4


def test_other_norms_are_left_alone():
    """Gemma's (1 + w) and OLMo 2's norms have another forward: they keep it."""
    for kind in ("gemma", "olmo2"):
        model = tiny_model(kind, "sdpa")
        assert fuse_rms_norms(model) == 0
        assert not any(type(m).__module__ == "orpo.model.fast.rms_norm" for m in model.modules())


def test_training_loads_models_with_fused_norms(chat_model_dir):
    from orpo.config import load_config
    from orpo.model.load import load_model, load_tokenizer

    config = load_config(None, [f"model.name_or_path={chat_model_dir}"])
    tokenizer, new = load_tokenizer(config)
    model = load_model(config, tokenizer, new)
    norms = [m for m in model.modules() if type(m).__module__ == "orpo.model.fast.rms_norm"]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    assert fuse_rms_norms(model) == 0  # idempotent


def test_the_output_rebuilds_to_the_same_bits():
    norm = llama_norm(24)
    fuse_rms_norms(norm)
    x = torch.randn(5, 24) * 7
    out = norm(x)
    assert torch.equal(getattr(out, REBUILD)(), out)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "phi3"])
def test_lora_layers_rebuild_the_norms_output(kind):
    """With LoRA (fused layers, dropout 0.2): the same logits, LoRA gradients within 1e-5, and the adapters that
    read a norm's output keep none of it: two (tokens x hidden) fp32 tensors less per layer."""
    from peft import LoraConfig, get_peft_model

    from orpo.model.fast.lora_dropout import fuse_lora_dropout
    from orpo.model.fast.lora_linear import fuse_lora_linears

    ids = torch.randint(3, 96, (2, 11))
    results, kept = [], []
    for fuse in (False, True):
        model = tiny_model(kind, "sdpa").train()
        if fuse:
            fuse_rms_norms(model)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear", init_lora_weights=False))
        fuse_lora_dropout(model)
        assert fuse_lora_linears(model) > 0
        torch.manual_seed(3)  # the same dropout masks
        kept.append(saved_bytes(lambda m=model: m(input_ids=ids)))
        torch.manual_seed(3)
        logits = model(input_ids=ids).logits
        (logits.square().mean() + logits[:, :, 5].sum()).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(got, want)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, grad in want_grads.items():
        assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=name)
    config = model.config
    norm_outputs = 2 * ids.numel() * config.hidden_size * 4 * config.num_hidden_layers  # input and post-attention norms
    assert kept[0] - kept[1] >= norm_outputs
