"""A plain LoRA layer's whole forward and backward as one autograd function (fp32, no autocast).

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate operators: autograd then passes
over (tokens x features) tensors about ten times per layer and step (the dropout's scale, the adapter's
scaling, the sum, and each of their backwards) around the matmuls. `_LoraLinear` folds both scales into the
small (r x features) matrices and adds the adapter's product into the base output in place:

    forward   xd = x * keep                      (the only elementwise pass; keep as lora_dropout.keep_mask)
              a  = xd @ (A * s)^T                s = 1 / (1 - p): the dropout's scale
              y  = x @ W^T + bias + a @ (B * scaling)^T
    backward  da = dy @ (B * scaling)            dB = scaling * dy^T a        dA = s * da^T xd
              dx = dy @ W + keep * (da @ (A * s))

keeping x (or how to rebuild it, gated_mlp.REBUILD), the mask's bits (lora_dropout.pack_mask) and a (tokens x r). It draws the same
masks as the unfused layers and equals them up to float rounding (the scales are applied in another order).

`fuse_lora_linears(model)` swaps the class of each peft `lora.Linear` over an `nn.Linear` for a subclass whose
forward takes this path when the call is the plain case (one active adapter, not merged, no DoRA or other
variant, no bias on B, frozen base weight, every tensor fp32 or all of one dtype, autocast off) and peft's own
forward otherwise. Weights, state dicts, saving and merging are unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from .gated_mlp import REBUILD
from .lora_dropout import DropoutLinear, as_float, keep_mask, keep_scale, pack_mask, unpack_mask


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, p, rebuild):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        keep = keep_mask(x2.shape, p, x.device) if p > 0 else None  # (N, in) bool
        s = keep_scale(p)
        a_scaled = lora_a * s  # (r, in)
        b_scaled = lora_b * scaling  # (out, r)
        xd = as_float(keep, x2.dtype).mul_(x2) if keep is not None else x2
        a = xd @ a_scaled.T  # (N, r)
        y = F.linear(x2, weight, bias).addmm_(a, b_scaled.T)  # (N, out)
        ctx.rebuild, ctx.shape, ctx.scales = rebuild, shape, (s, scaling)
        ctx.save_for_backward(None if rebuild else x, weight, None if keep is None else pack_mask(keep), a, a_scaled, b_scaled)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bits, a, a_scaled, b_scaled = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        needs_x, needs_a, needs_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_x = grad_a = grad_b = None
        s, scaling = ctx.scales
        da = g @ b_scaled  # (N, r)
        keep = None if bits is None else as_float(unpack_mask(bits, torch.Size((g.shape[0], a_scaled.shape[1]))), g.dtype)  # (N, in) 0./1.
        if needs_b:
            grad_b = (g.T @ a).mul_(scaling)  # (out, r)
        if needs_a:
            x = ctx.rebuild() if ctx.rebuild is not None else x
            x2 = x.reshape(-1, x.shape[-1])
            xd = x2 * keep if keep is not None else x2
            grad_a = (da.T @ xd).mul_(s)  # (r, in)
        if needs_x:
            lora_dx = da @ a_scaled  # (N, in)
            if keep is not None:
                lora_dx.mul_(keep)
            grad_x = (g @ weight).add_(lora_dx).view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _plain_call(layer, x, args, kwargs) -> str | None:
    """The active adapter when this call is the plain case `_LoraLinear` computes, else None."""
    if args or kwargs or layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in (getattr(layer, "lora_variant", None) or {}) or layer.use_dora.get(name):
        return None
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not layer.training)):
        return None  # a dropout that fuse_lora_dropout did not fuse
    if type(lora_a) not in (nn.Linear, DropoutLinear) or type(lora_b) is not nn.Linear or lora_a.bias is not None or lora_b.bias is not None:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if torch.is_autocast_enabled(x.device.type) or len({x.dtype, base.weight.dtype, lora_a.weight.dtype, lora_b.weight.dtype}) != 1:
        return None
    return name


class FusedLoraLinear(nn.Module):
    """Mixed into peft's lora.Linear by fuse_lora_linears: the plain case through _LoraLinear."""

    def forward(self, x, *args, **kwargs):
        name = _plain_call(self, x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        lora_a = self.lora_A[name]
        p = getattr(lora_a, "p", 0.0) if self.training else 0.0
        base = self.base_layer
        return _LoraLinear.apply(x, base.weight, base.bias, lora_a.weight, self.lora_B[name].weight, self.scaling[name], p,
                                 getattr(x, REBUILD, None))


@functools.cache
def _fused_class() -> tuple[type, type]:
    """peft's lora.Linear (imported when first needed) and its subclass with the fused forward."""
    from peft.tuners.lora.layer import Linear

    return Linear, type("FusedLinear", (FusedLoraLinear, Linear), {"__module__": __name__})


def fuse_lora_linears(model: nn.Module) -> int:
    """Give every peft lora.Linear over a plain nn.Linear the fused forward; returns how many."""
    linear, fused_linear = _fused_class()
    fused = 0
    for module in model.modules():
        if type(module) is linear and type(module.base_layer) is nn.Linear:
            module.__class__ = fused_linear
            fused += 1
    return fused
