"""Gated MLPs that keep two of their three wide tensors for backward, with the same numbers.

Llama-style models compute `down_proj(act(gate_proj(x)) * up_proj(x))`. Autograd keeps, per layer and token,
four tensors of the intermediate size: the gate (for act's backward), act(gate) and up (for the product's
backward), and the product (for down_proj's LoRA or weight gradient). `GatedProduct` keeps the gate and up
only and recomputes act(gate) in backward with the same operators. The product itself carries a way to rebuild
it (`REBUILD`), which down_proj's fused LoRA dropout (lora_dropout.py) keeps instead of the tensor. The forward
and every gradient stay bitwise those of the model's own code, with half of the MLP's activation memory of a
LoRA step (a quarter of it on SmolLM2).

`fuse_gated_mlps(model)` swaps the class of each MLP whose forward is exactly that expression (checked in its
source, so a transformers release that changes it is left alone) for a subclass with the fused forward.
Parameters, state dicts and saving are unchanged.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

EXPRESSION = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"
REBUILD = "orpo_rebuild"  # attribute of a product: a function of no arguments that computes it again


class GatedProduct(torch.autograd.Function):
    """act(gate) * up, keeping gate and up (act recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate, up, act, box):
        ctx.act, ctx.box = act, box
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = saved(ctx)
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(gate.requires_grad)
            activated = ctx.act(leaf)
        grad_up = grad * activated.detach() if ctx.needs_input_grad[1] else None
        grad_gate = torch.autograd.grad(activated, leaf, grad * up)[0] if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None, None


def saved_by(node, box: dict, held: tuple | None) -> tuple:
    """The tensors `node` (the backward node of GatedProduct or the fused RMSNorm) saved, for a rebuild at backward
    time; `held` when there is no node (no gradient). A rebuild reads them through the node rather than holding
    them: under gradient checkpointing a node's saved tensors are placeholders recomputed in the backward, while a
    tensor a closure held would stay alive through the whole forward, the memory checkpointing exists to free.
    Checkpointing lets each be unpacked once: the first reader leaves them in `box` for the others and the node."""
    if node is None:
        return held
    if "saved" not in box:
        box["saved"] = tuple(node.saved_tensors)
    return box["saved"]


def saved(ctx) -> tuple:
    """A fused node's saved tensors in its backward: those a rebuild already unpacked (saved_by), else its own."""
    return ctx.box.pop("saved", None) or ctx.saved_tensors


def _fused_forward(self, x):
    gate, up, act, box = self.gate_proj(x), self.up_proj(x), self.act_fn, {}
    product = GatedProduct.apply(gate, up, act, box)
    node = product.grad_fn
    held = None if node is not None else (gate, up)
    setattr(product, REBUILD, lambda: _product(act, *saved_by(node, box, held)))  # gate and up are kept for backward anyway
    return self.down_proj(product)


def _product(act, gate, up):
    return act(gate.detach()) * up.detach()


_FUSED: dict[type, type | None] = {}  # MLP class -> its fused subclass (None: not fusable)


def _fusable(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return EXPRESSION in " ".join(source.split())


def swap_forward(model: nn.Module, forward, candidate, fusable, cache: dict[type, type | None]) -> int:
    """Give each module of `model` that is a `candidate` and whose class is `fusable` a subclass whose forward is
    `forward` (one subclass per class, kept in `cache`, None for a class that is not fusable); returns how many."""
    fused = 0
    for module in model.modules():
        cls = type(module)
        if cls.forward is forward or not candidate(module):
            continue
        if cls not in cache:
            cache[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "__module__": forward.__module__}) if fusable(cls) else None
        if cache[cls] is not None:
            module.__class__ = cache[cls]
            fused += 1
    return fused


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give every Llama-style gated MLP of `model` the fused forward; returns how many."""
    parts = ("gate_proj", "up_proj", "down_proj", "act_fn")
    return swap_forward(model, _fused_forward, lambda m: all(hasattr(m, n) for n in parts), _fusable, _FUSED)
