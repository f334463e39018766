"""Llama-style RMSNorm as one autograd function: the model's own forward, a backward of four passes.

    forward   r = rsqrt(mean(x^2) + eps)      y = w * (x r)          (x in fp32, then cast, as the model does)
    backward  gw = g * w                       dx = r gw - x r^3 mean(gw x)          dw = sum over tokens of g (x r)

Autograd differentiates the model's code operator by operator: about twenty passes over (tokens x hidden)
tensors per norm and step, 1.8 ms of a SmolLM2 pass's 418 tokens on this CPU (61 norms per pass, about 5% of a
LoRA step). `_RMSNorm` computes the same forward with the same operators (so the same bits), keeps the input and
r, and differentiates in closed form, in fp32. The normalised input is not kept: with a trained weight (full
fine-tuning) backward recomputes it, one (tokens x hidden) tensor less per norm. The output carries a way to
rebuild it from x (`gated_mlp.REBUILD`), so the fused LoRA layers that read it (q, k, v, gate, up) keep none of
it either: two (tokens x hidden) tensors less per layer of a LoRA step, about a seventh of its activations.

`fuse_rms_norms(model)` swaps the class of each norm whose forward is Llama's (the same bytecode, as in Mistral,
Qwen2/3, Phi-3, Granite, SmolLM3; Gemma's `1 + w` and OLMo 2's form differ and keep their own) for a subclass with
this forward. Parameters, state dicts and saving are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .gated_mlp import REBUILD, saved, saved_by, swap_forward


def _normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x r, r) in fp32 with the model's operators: r = rsqrt(mean(x^2, last dim) + eps), shape (..., 1)."""
    xf = x.to(torch.float32)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * r, r


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, stash):
        normed, r = _normalise(x, eps)
        stash["r"] = r  # for the output's REBUILD without gradients (taken out by the caller)
        ctx.box = stash
        ctx.save_for_backward(x, weight, r)
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = saved(ctx)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            product = grad * (x.to(torch.float32) * r).to(x.dtype)  # g * (x r), in the forward product's dtype
            grad_weight = product.sum(tuple(range(product.dim() - 1))).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gw = (grad * weight).to(torch.float32)  # d loss / d (x r)
            xf = x.to(torch.float32)
            dot = torch.linalg.vecdot(gw, xf).unsqueeze(-1)  # (..., 1) sum over hidden of gw x
            coeff = dot.mul_(r.pow(3)).div_(x.shape[-1])  # r^3 mean(gw x)
            grad_x = gw.mul_(r).addcmul_(xf, coeff, value=-1.0).to(x.dtype)
        return grad_x, grad_weight, None, None


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    stash = {}
    out = _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, stash)
    # x and r are kept for the norm's backward anyway: read from its node (gated_mlp.saved_by), not held here
    node, r = out.grad_fn, stash.pop("r")
    held = None if node is not None else (hidden_states, self.weight, r)
    setattr(out, REBUILD, lambda: _rebuild(*saved_by(node, stash, held)))
    return out


def _rebuild(x, weight, r):
    """The norm's output from its saved input and 1/rms, with the forward's operators."""
    x, weight = x.detach(), weight.detach()
    return weight * (x.to(torch.float32) * r).to(x.dtype)


def _llama_forward_code():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward.__code__


_FUSED: dict[type, type | None] = {}  # norm class -> its fused subclass (None: not fusable)


def _fusable(cls: type) -> bool:
    code, llama = getattr(cls.forward, "__code__", None), _llama_forward_code()
    return code is not None and code.co_code == llama.co_code and code.co_consts == llama.co_consts and code.co_names == llama.co_names


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every Llama-style RMSNorm of `model` the fused forward; returns how many."""
    def candidate(module):
        return hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), nn.Parameter)

    return swap_forward(model, _fused_norm_forward, candidate, _fusable, _FUSED)
