"""The packed layout's attention structure, in the form the model's attention kernel takes.

Token q of a packed row may read token k when both belong to the same pair, k comes no later than q, and q
is not a rejected token reading a chosen one (training/layout.py). Sliding-window layers add: position(q) -
position(k) < window, positions being those each response has alone, so a window cuts exactly where it
would in the plain layout.

The structure goes through the model's own forward as a prepared 4-D mask, which transformers passes to
the kernel untouched:
- sdpa: a boolean mask (True = attend), the CPU default;
- eager: an additive float mask (0 or the dtype's minimum);
- flex_attention: a BlockMask, whose fully masked blocks are skipped (CUDA; on the CPU torch runs it only
  without gradients). Opt-in through model.attn_implementation until it has passed the GPU check.
Models with several layer types (Gemma 2/3, Qwen2/3) take a dict of masks keyed by layer type. The masks
are built from a packed `training.layout.Batch` (its segment, role and position_ids rows); this stage comes
before training, so it reads those fields without importing the class.

On the CPU, sdpa runs as `split_attention` (registered with transformers as SPLIT): one pair at a time, the
prompt and chosen tokens as one causal call, the rejected tokens as a second call on the prompt's and their
own keys and values. A dense mask makes the kernel compute every masked block (other pairs in the row, the
chosen block of the rejected rows) and repeat the shared key/value heads; one call per piece skips both. The
dense mask stays the fallback for what the split does not cover (a window that cuts a pair, soft-capping,
attention dropout, other devices).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3  # token roles in a packed row (training/layout.py writes them)
SPLIT = "orpo_split_sdpa"  # the attention kernel split_attention registers: it reads a row pair by pair
# Model types whose forward takes a prepared mask, explicit position_ids and logits_to_keep, each checked
# against the plain layout in tests/test_layout.py. Others must use layout=plain.
PACKED_MODEL_TYPES = (
    "gemma", "gemma2", "gemma3_text", "llama", "mistral", "mixtral", "olmo2", "phi3", "qwen2", "qwen3", "qwen3_moe",
)
KERNELS = ("sdpa", "eager", "flex_attention", SPLIT)
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


def allowed(batch, window: int | None = None) -> torch.Tensor:
    """(R, 1, L, L) bool: may query q read key k (see module doc)."""
    seg, role, pos = batch.segment, batch.role, batch.position_ids  # (R, L) each
    index = torch.arange(seg.shape[1], device=seg.device)  # (L,)
    ok = seg[:, :, None] == seg[:, None, :]  # (R, L, L) same pair (padding: its own segment -1)
    ok &= index[None, None, :] <= index[None, :, None]  # causal in row order
    ok &= ~((role[:, :, None] == REJECTED) & (role[:, None, :] == CHOSEN))
    if window is not None:
        ok &= (pos[:, :, None] - pos[:, None, :]) < window
    return ok[:, None]  # (R, 1, L, L)


def _flex_mask(batch, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    seg, role, pos = batch.segment, batch.role, batch.position_ids

    def mask_mod(b, h, q, k):
        ok = (seg[b, q] == seg[b, k]) & (k <= q) & ~((role[b, q] == REJECTED) & (role[b, k] == CHOSEN))
        if window is not None:
            ok = ok & ((pos[b, q] - pos[b, k]) < window)
        return ok

    rows, length = seg.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=seg.device)


def _mask(batch, config, window: int | None, dtype: torch.dtype):
    kernel = getattr(config, "_attn_implementation", None) or "eager"
    if kernel == "flex_attention":
        return _flex_mask(batch, window)
    ok = allowed(batch, window)  # (R, 1, L, L)
    if kernel in ("sdpa", SPLIT):
        return ok
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)


def model_mask(batch, config, dtype: torch.dtype):
    """The attention_mask argument for the model's forward: one mask, or a dict by layer type."""
    problem = packed_problem(config)
    if problem:
        raise ValueError(f"layout=packed: {problem}; set layout=plain")
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {kind: _mask(batch, config, _window(config, kind), dtype) for kind in sorted(set(layer_types))}
    return _mask(batch, config, _window(config, None), dtype)


@functools.lru_cache(maxsize=512)
def _rejected_mask(p: int, n: int, device: torch.device) -> torch.Tensor:
    """(n, p+n) bool: rejected token j reads the p prompt tokens and rejected tokens 0..j."""
    return torch.ones((n, p + n), dtype=torch.bool, device=device).tril(p)


def _reach(spans) -> int:
    """The largest position distance between two tokens of one pair (a window larger than it cuts nothing)."""
    return max((p + max(c, n) - 1 for row in spans for _, p, c, n in row), default=0)


def split_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, orpo_spans=None, **kwargs):
    """Attention of a packed pass, pair by pair (see module doc); the model's sdpa on the dense mask otherwise.

    query (R, Hq, L, D), key/value (R, Hkv, L, D); returns ((R, L, Hq, D), None) as transformers' kernels do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.get("sliding_window")
    if (orpo_spans is None or query.device.type != "cpu" or dropout or query.shape[2] != key.shape[2]
            or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or (window is not None and window <= _reach(orpo_spans))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    length = query.shape[2]
    rows = []
    for r, spans in enumerate(orpo_spans):
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]  # (1, H, L, D)
        pieces, end = [], 0
        for start, p, c, n in spans:
            mid, end = start + p + c, start + p + c + n  # chosen ends, rejected ends
            if mid > start:  # prompt and chosen: plain causal attention
                pieces.append(F.scaled_dot_product_attention(
                    q[:, :, start:mid], k[:, :, start:mid], v[:, :, start:mid], is_causal=True, scale=scaling, enable_gqa=gqa))
            if n:  # rejected: the prompt's keys and values, then their own, causally
                keys = torch.cat([k[:, :, start : start + p], k[:, :, mid:end]], dim=2)
                values = torch.cat([v[:, :, start : start + p], v[:, :, mid:end]], dim=2)
                pieces.append(F.scaled_dot_product_attention(
                    q[:, :, mid:end], keys, values, attn_mask=_rejected_mask(p, n, q.device), scale=scaling, enable_gqa=gqa))
        if end < length:  # padding at the row's end: read by nothing, scored by nothing
            pieces.append(q.new_zeros((1, q.shape[1], length - end, q.shape[3])))
        rows.append(torch.cat(pieces, dim=2))
    out = torch.cat(rows) if len(rows) > 1 else rows[0]  # (R, Hq, L, D)
    return out.transpose(1, 2).contiguous(), None


def register_split() -> None:
    """Make SPLIT a transformers attention implementation (masks built as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SPLIT, split_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SPLIT, sdpa_mask)


def use_split(config, device: torch.device) -> str | None:
    """Switch an sdpa model to split_attention when its packed passes run on the CPU; returns the kernel."""
    kernel = getattr(config, "_attn_implementation", None)
    if kernel == "sdpa" and device.type == "cpu" and packed_problem(config) is None:
        register_split()
        config._attn_implementation = kernel = SPLIT
    return kernel
