"""The packed layout's attention structure, in the form the model's attention kernel takes.

Token q of a packed row may read token k when both belong to the same pair, k comes no later than q, and q
is not a rejected token reading a chosen one (layout.py). Sliding-window layers add: position(q) -
position(k) < window, positions being those each response has alone, so a window cuts exactly where it
would in the plain layout.

The structure goes through the model's own forward as a prepared 4-D mask, which transformers passes to
the kernel untouched:
- sdpa: a boolean mask (True = attend), the CPU default;
- eager: an additive float mask (0 or the dtype's minimum);
- flex_attention: a BlockMask, whose fully masked blocks are skipped (CUDA; on the CPU torch runs it only
  without gradients). Opt-in through model.attn_implementation until it has passed the GPU check.
Models with several layer types (Gemma 2/3, Qwen2/3) take a dict of masks keyed by layer type.
"""

from __future__ import annotations

import torch

from .layout import CHOSEN, REJECTED, Batch

# Model types whose forward takes a prepared mask, explicit position_ids and logits_to_keep, each checked
# against the plain layout in tests/test_layout.py. Others must use layout=plain.
PACKED_MODEL_TYPES = (
    "gemma", "gemma2", "gemma3_text", "llama", "mistral", "mixtral", "olmo2", "phi3", "qwen2", "qwen3", "qwen3_moe",
)
KERNELS = ("sdpa", "eager", "flex_attention")
LAYER_TYPES = ("full_attention", "sliding_attention")


def packed_problem(config) -> str | None:
    """Why the packed layout cannot run on a model with this transformers config, or None when it can."""
    kind = getattr(config, "model_type", "?")
    if kind not in PACKED_MODEL_TYPES:
        return f"model type '{kind}' is not one the packed layout is verified on ({', '.join(PACKED_MODEL_TYPES)})"
    kernel = getattr(config, "_attn_implementation", None) or "eager"
    if kernel not in KERNELS:
        return f"attention kernel '{kernel}' cannot take the shared-prompt mask (use one of {', '.join(KERNELS)})"
    odd = sorted(set(getattr(config, "layer_types", None) or []) - set(LAYER_TYPES))
    if odd:
        return f"layer types {odd} are not supported by the packed layout"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention is not a causal language model"
    return None


def _window(config, layer_type: str | None) -> int | None:
    """The sliding window of a layer type; models without layer types window every layer when set."""
    size = getattr(config, "sliding_window", None)
    if layer_type is None:
        return size
    return size if layer_type == "sliding_attention" else None


def allowed(batch: Batch, window: int | None = None) -> torch.Tensor:
    """(R, 1, L, L) bool: may query q read key k (see module doc)."""
    seg, role, pos = batch.segment, batch.role, batch.position_ids  # (R, L) each
    index = torch.arange(seg.shape[1], device=seg.device)  # (L,)
    ok = seg[:, :, None] == seg[:, None, :]  # (R, L, L) same pair (padding: its own segment -1)
    ok &= index[None, None, :] <= index[None, :, None]  # causal in row order
    ok &= ~((role[:, :, None] == REJECTED) & (role[:, None, :] == CHOSEN))
    if window is not None:
        ok &= (pos[:, :, None] - pos[:, None, :]) < window
    return ok[:, None]  # (R, 1, L, L)


def _flex_mask(batch: Batch, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    seg, role, pos = batch.segment, batch.role, batch.position_ids

    def mask_mod(b, h, q, k):
        ok = (seg[b, q] == seg[b, k]) & (k <= q) & ~((role[b, q] == REJECTED) & (role[b, k] == CHOSEN))
        if window is not None:
            ok = ok & ((pos[b, q] - pos[b, k]) < window)
        return ok

    rows, length = seg.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=seg.device)


def _mask(batch: Batch, config, window: int | None, dtype: torch.dtype):
    kernel = getattr(config, "_attn_implementation", None) or "eager"
    if kernel == "flex_attention":
        return _flex_mask(batch, window)
    ok = allowed(batch, window)  # (R, 1, L, L)
    if kernel == "sdpa":
        return ok
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)


def model_mask(batch: Batch, config, dtype: torch.dtype):
    """The attention_mask argument for the model's forward: one mask, or a dict by layer type."""
    problem = packed_problem(config)
    if problem:
        raise ValueError(f"layout=packed: {problem}; set layout=plain")
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {kind: _mask(batch, config, _window(config, kind), dtype) for kind in sorted(set(layer_types))}
    return _mask(batch, config, _window(config, None), dtype)
