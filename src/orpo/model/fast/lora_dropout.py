"""LoRA's input dropout fused into the A projection: the mask kept for backward as bits, random bits drawn 64 at a time.

peft computes `lora_B(lora_A(dropout(x)))` for every adapted layer. `nn.Dropout` on CPU draws one Bernoulli per
element (one call of the generator each, the slowest operator of a LoRA step after the matmuls), and autograd
keeps two fp32 tensors of the input's size per layer: the noise (for the multiply) and the dropped input (for
lora_A's weight gradient). q, k and v each keep their own pair for the same input.

`fuse_lora_dropout(model)` swaps each such `lora_A` (an nn.Linear) for a `DropoutLinear` holding the same weight
(state dict, saving, merging unchanged) and the dropout for an identity. Its autograd function keeps a reference
to the input (shared by the layers that read it, and often kept alive anyway) and the keep mask as one bit per
element (`pack_mask`, 8 to a byte); the dropped input is rebuilt in backward. An input that can be computed again from tensors kept anyway
(a gated MLP's product, gated_mlp.REBUILD) is not kept at all: backward computes it again, to the same bits.
The mask comes from 16-bit lanes of random int64 words: an element is dropped when its lane falls under round(p * 65536), so p is rounded to a multiple of 1/65536
(0.05 -> 0.0500031) and kept elements are scaled by 1 / (1 - that p), which keeps the layer's expectation exact.
In eval mode (and with p = 0) the layer is the plain linear map.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .gated_mlp import REBUILD

LANES = 1 << 16  # values of one 16-bit lane


def drop_threshold(p: float) -> int:
    """Lanes (signed int16) below this value are dropped: round(p * 65536) of the 65536 values."""
    return -(LANES // 2) + round(p * LANES)


def effective_p(p: float) -> float:
    return round(p * LANES) / LANES


def keep_scale(p: float) -> float:
    """The factor kept elements are scaled by: 1 / (1 - effective_p(p)) (1 for p = 0)."""
    return 1.0 / (1.0 - effective_p(p))


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool tensor of `shape`, each element True with probability 1 - effective_p(p), from the torch generator."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # 4 lanes a word
    return words.view(torch.int16)[:n].view(shape) >= drop_threshold(p)


_GATHER = 0x0102040810204080  # times 8 bytes of 0/1: bit 56 + i of the product is byte i
_SPREAD = 0x0101010101010101  # times one byte: that byte in each of 8 bytes
_BIT_OF_BYTE = 0x8040201008040201 - (1 << 64)  # byte j: bit j (as a signed int64)
_CARRY = 0x7F7F7F7F7F7F7F7F  # plus a byte that is 0 or 2^j: bit 7 set exactly when it was not 0


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, 8 to a uint8 (element 8k + i is bit i of byte k): what autograd keeps of a mask."""
    flat = keep.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    words = flat.view(torch.uint8).view(torch.int64)  # 8 elements a word, one per byte
    return ((words * _GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def unpack_mask(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """pack_mask's bool tensor of `shape` again, from its bits (integer ops on 8 elements at a time)."""
    words = bits.to(torch.int64).mul_(_SPREAD).bitwise_and_(_BIT_OF_BYTE).add_(_CARRY)
    words = words.bitwise_right_shift_(7).bitwise_and_(_SPREAD)  # each byte 0 or 1
    return words.view(torch.uint8)[: shape.numel()].view(torch.bool).view(shape)


def as_float(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask as 0./1. of `dtype`, to multiply by. On a CPU a product with a bool tensor (or torch.where,
    masked_fill_) takes 4-10 times as long as one with floats; the bool's bytes read as uint8 convert fast."""
    return keep.view(torch.uint8).to(dtype)


class _DropoutLinear(torch.autograd.Function):
    """y = (x * keep / (1 - p)) @ W^T, saving x (or how to rebuild it) and the mask's bits instead of two fp32 copies."""

    @staticmethod
    def forward(ctx, x, weight, p, rebuild=None):  # x (..., in), weight (out, in)
        keep = keep_mask(x.shape, p, x.device)
        scale = keep_scale(p)
        y = F.linear(as_float(keep, x.dtype).mul_(x).mul_(scale), weight)  # under autocast the matmul runs in the autocast dtype
        ctx.rebuild, ctx.x_dtype, ctx.shape = rebuild, x.dtype, keep.shape
        ctx.save_for_backward(None if rebuild else x, weight, pack_mask(keep))
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bits = ctx.saved_tensors
        compute = grad_y.dtype  # the forward's matmul dtype (autocast or not); backward runs in it too
        keep = as_float(unpack_mask(bits, ctx.shape), compute)  # 0./1., converted once for both gradients
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ weight.to(compute)).mul_(keep).mul_(ctx.scale).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x = ctx.rebuild() if ctx.rebuild is not None else x
            dropped = keep.clone().mul_(x).mul_(ctx.scale)  # in the compute dtype, as the forward
            grad_weight = (grad_y.reshape(-1, grad_y.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_weight, None, None


class DropoutLinear(nn.Linear):
    """lora_A with its input dropout inside; `p` is set by fuse_lora_dropout. No bias (LoRA's A has none)."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return F.linear(x, self.weight)
        return _DropoutLinear.apply(x, self.weight, self.p, getattr(x, REBUILD, None))


def fuse_lora_dropout(model: nn.Module) -> int:
    """Fuse every plain LoRA adapter's dropout into its A projection; returns how many were fused.
    Adapters with a variant (DoRA, ...), a bias on A, or an A that is not exactly nn.Linear keep peft's path."""
    fused = 0
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, dropout in list(dropouts.items()):
            a = lora_a[name] if name in lora_a else None
            if not isinstance(dropout, nn.Dropout) or dropout.p == 0.0 or name in variants:
                continue
            if type(a) is not nn.Linear or a.bias is not None:
                continue
            a.__class__ = DropoutLinear
            a.p = float(dropout.p)
            dropouts[name] = nn.Identity()
            fused += 1
    return fused
