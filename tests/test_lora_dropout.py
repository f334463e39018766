"""The fused LoRA dropout: the same function as dropout-then-linear for the mask it draws, the right drop rate,
less kept for backward, and swapped into every plain adapter that training builds (weights and files unchanged)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from orpo.config import load_config
from orpo.model.fast.lora_dropout import (
    DropoutLinear,
    _DropoutLinear,
    effective_p,
    fuse_lora_dropout,
    keep_mask,
    pack_mask,
    unpack_mask,
)
from orpo.model.load import load_model, load_tokenizer


def test_fused_layer_equals_dropout_then_linear_for_its_mask():
    """Output, input gradient and weight gradient equal (x * keep / (1 - p)) @ W^T with the mask the layer drew
    (replayed from the same seed), on an odd 3-d shape."""
    torch.manual_seed(1)
    x = torch.randn(3, 47, 24, dtype=torch.float64)
    w = torch.randn(5, 24, dtype=torch.float64)
    grad_y = torch.randn(3, 47, 5, dtype=torch.float64)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.manual_seed(7)
    y = _DropoutLinear.apply(xf, wf, 0.3)
    y.backward(grad_y)
    torch.manual_seed(7)
    keep = keep_mask(x.shape, 0.3, x.device)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    yr = (xr * keep / (1 - effective_p(0.3))) @ wr.T
    yr.backward(grad_y)
    assert 0 < (~keep).sum() < keep.numel()
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wf.grad, wr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_mask_drops_p_of_the_elements_independently(p):
    """Drop rate within 5 standard deviations of p (rounded to 1/65536, never by more than 1/131072), and every
    one of the 4 lanes of a random word has that rate (a lane that never varied would show here)."""
    assert abs(effective_p(p) - p) <= 1 / 131072
    torch.manual_seed(0)
    n = 4 * 250_000
    keep = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    sd = math.sqrt(p * (1 - p) / n)
    assert abs((~keep).float().mean().item() - effective_p(p)) < 5 * sd
    for lane in range(4):
        assert abs((~keep[lane::4]).float().mean().item() - effective_p(p)) < 5 * 2 * sd
    pairs = (~keep[:-1] & ~keep[1:]).float().mean().item()  # neighbours independent: both dropped with p^2
    assert abs(pairs - effective_p(p) ** 2) < 5 * math.sqrt(p * p * (1 - p * p) / n)


def test_fused_layer_keeps_one_bit_of_mask_not_two_float_copies():
    """Autograd keeps the input itself (no copy), the weight and the mask's bits: 1 new byte per 8 input elements,
    where dropout-then-linear keeps 8 bytes per element (fp32 noise and fp32 dropped input)."""
    x = torch.randn(64, 32, requires_grad=True)
    layer = nn.Linear(32, 4, bias=False)
    new_bytes = {}

    def count(name):
        def pack(t):
            if t.data_ptr() not in (x.data_ptr(), layer.weight.data_ptr()):
                new_bytes[name] = new_bytes.get(name, 0) + t.numel() * t.element_size()
            return t
        return pack

    with torch.autograd.graph.saved_tensors_hooks(count("peft"), lambda t: t):
        layer(nn.functional.dropout(x, 0.1, training=True))
    with torch.autograd.graph.saved_tensors_hooks(count("fused"), lambda t: t):
        _DropoutLinear.apply(x, layer.weight, 0.1)
    assert new_bytes["fused"] == x.numel() // 8  # one bit per element
    assert new_bytes["peft"] >= 8 * x.numel()


def test_autocast_bf16_runs_forward_and_backward_in_its_dtypes():
    torch.manual_seed(0)
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _DropoutLinear.apply(x, w, 0.2)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert torch.isfinite(w.grad).all()


def build(model_dir, dropout: float):
    config = load_config(None, [f"model.name_or_path={model_dir}", "lora.r=4", "lora.alpha=8", f"lora.dropout={dropout}"])
    tokenizer, new_ids = load_tokenizer(config)
    torch.manual_seed(0)
    return load_model(config, tokenizer, new_ids)


def test_training_model_has_every_adapter_fused_with_unchanged_weights(chat_model_dir):
    """Every LoRA layer of a training model with dropout gets the fused A, none keeps an nn.Dropout, the state dict
    (names, values) is peft's own, and in eval mode the model computes what the unfused one computes."""
    from peft.tuners.lora import LoraLayer

    model = build(chat_model_dir, 0.1)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(type(m.lora_A["default"]) is DropoutLinear for m in layers)
    assert all(m.lora_A["default"].p == 0.1 for m in layers)
    assert not any(isinstance(d, nn.Dropout) for m in layers for d in m.lora_dropout.values())

    plain = build(chat_model_dir, 0.1)
    for m in plain.modules():  # undo the fusion: peft's own modules, same weights
        if isinstance(m, LoraLayer):
            m.lora_A["default"].__class__ = nn.Linear
            m.lora_dropout["default"] = nn.Dropout(0.1)
    assert model.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        plain.load_state_dict(model.state_dict())
        ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
        assert not torch.equal(model.train()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)  # dropout on


def test_zero_dropout_and_variants_keep_peft_modules(chat_model_dir):
    model = build(chat_model_dir, 0.0)
    assert not any(isinstance(m, DropoutLinear) for m in model.modules())
    assert fuse_lora_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))) == 0  # not a LoRA layer


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_mask_bits_unpack_to_the_mask(n):
    """Every length (padded to whole bytes), both values at every position of a byte, in element order."""
    torch.manual_seed(n)
    keep = torch.rand(3, n) > 0.5
    bits = pack_mask(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-keep.numel() // 8)
    assert torch.equal(unpack_mask(bits, keep.shape), keep)
    one = torch.zeros(16, dtype=torch.bool)
    one[3] = one[9] = True
    assert pack_mask(one).tolist() == [1 << 3, 1 << 1]
    assert torch.equal(unpack_mask(pack_mask(~one), one.shape), ~one)
