"""Batch -> per-token log-probs on the layout's grid (2b, W): the only place a batch meets the model.

plain layout: the model's full logits (2b, T, V), log-softmax in fp32 (loss.token_logps), the reference.

packed layout: the model runs with `logits_to_keep` empty, so it builds no logits; its final hidden states
are read at the scored positions only and go through the output layer here, `chunk` tokens at a time:

    logits = softcap(h W^T + b)       log p(y) = logits[y] - logsumexp(logits)      (fp32 from the matmul on)

so the loss's memory is O(chunk x vocabulary) whatever the batch and sequence length. The backward never
stores a chunk's logits: with a frozen output layer (LoRA, QLoRA) each chunk's d log p / d h =
(onehot(y) - softmax) W (times the softcap's derivative) is formed in the forward, right after the
logits it needs, and kept (N, H); the backward only scales it by the incoming gradient. With a trained
output layer (full fine-tuning) the backward recomputes each chunk's logits for W's gradient, unless the
pass's d log p / d logits fits in KEEP_ELEMENTS values: then the forward keeps it and the backward scales it.
The rows of tokens added by the ChatML set-up (peft trainable tokens) train either way: their few logit
columns are kept per token, (N, k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.fast.attention import SPLIT, model_mask, packed_problem
from .layout import Batch
from .loss import token_logps

CHUNK_ELEMENTS = 1 << 24  # default chunk: 16M fp32 logits (64 MB) per chunk, whatever the vocabulary
KEEP_ELEMENTS = 2 * CHUNK_ELEMENTS  # a trained output layer keeps d log p / d logits up to this size (128 MB)


def causal_lm(model):
    """The transformers model inside DDP/compile wrappers and a peft model."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class Head:
    """The output layer as tensors: logits = softcap(hidden @ weight^T + bias), rows[j] replaced by delta[j]."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    rows: torch.Tensor | None  # (k,) token ids whose weight rows are `delta` (peft trainable tokens)
    delta: torch.Tensor | None  # (k, H)
    softcap: float | None

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]


def output_head(model) -> Head:
    """The model's output layer: a Linear, or peft's trainable-tokens wrapper around one."""
    lm = causal_lm(model)
    layer = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    for name in ("logit_scale", "logits_scaling"):  # Cohere / Granite scale their logits: not handled here
        if getattr(lm.config, name, None) not in (None, 1.0):
            raise ValueError(f"layout=packed: {lm.config.model_type} scales its logits ({name}); set layout=plain")
    adapter = getattr(layer, "token_adapter", None)
    if adapter is not None:  # peft TrainableTokensWrapper (new ChatML rows of a tied or untied head)
        base = adapter.base_layer
        names = [n for n in adapter.active_adapters if n in adapter.trainable_tokens_delta]
        if adapter.disable_adapters or adapter.merged or not names:
            return Head(base.weight, None, None, None, softcap)
        if len(names) > 1:
            raise ValueError("layout=packed: several active trainable-token adapters; set layout=plain")
        rows = torch.tensor(adapter.token_indices[names[0]], device=base.weight.device)
        return Head(base.weight, None, rows, adapter.trainable_tokens_delta[names[0]], softcap)
    if not isinstance(layer, torch.nn.Linear) or type(layer).forward is not torch.nn.Linear.forward:
        # e.g. LoRA or quantization on the output layer itself (FSDP2's FSDPLinear is a plain Linear)
        raise ValueError(f"layout=packed: output layer {type(layer).__name__} is not a plain Linear; set layout=plain")
    if hasattr(layer.weight, "device_mesh"):  # FSDP2 keeps it gathered from the forward to the backward; not here
        raise ValueError("layout=packed: the output layer's weight is sharded outside the model's forward "
                         "(its FSDP group must keep it gathered, reshard_after_forward=False); set layout=plain")
    return Head(layer.weight, layer.bias, None, None, softcap)


def check_packed(model) -> None:
    """Raise ValueError (one line: what, and to set layout=plain) when the packed layout cannot serve `model`."""
    problem = packed_problem(causal_lm(model).config)
    if problem:
        raise ValueError(f"layout=packed: {problem}; set layout=plain")
    output_head(model)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype the model's own head would use: the autocast dtype when autocast is on."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def _chunk_logits(h, weight, bias, rows, delta, softcap, buffer=None):
    """fp32 logits (c, V) of one chunk, and tanh(raw/softcap) (c, V) when soft-capped (else None). With `buffer`
    (at least (c, V), the matmul's dtype) the logits are written there: on a CPU a fresh (c, V) tensor is fresh
    pages from the kernel, and faulting them in made the product a quarter slower."""
    raw = h @ weight.T if buffer is None else torch.mm(h, weight.T, out=buffer[: h.shape[0]])  # (c, V)
    if rows is not None:
        raw[:, rows] = h @ delta.T  # (c, k) the trained rows
    raw = raw.float()
    if bias is not None:
        raw += bias.float()
    if softcap is None:
        return raw, None
    capped = raw.div_(softcap).tanh_()  # (c, V) in place over raw
    return capped * softcap, capped


def _logp_and_grad(logits, capped, target, grad: bool):
    """log p(target) (c,) of fp32 logits (c, V); with `grad`, also d log p / d raw logits (c, V) = onehot -
    softmax (times the softcap's derivative). Works in place over `logits`: one (c, V) buffer per chunk."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    picked = logits[rows, target]  # (c,)
    top = logits.amax(dim=-1)  # (c,)
    weights = logits.sub_(top[:, None]).exp_()  # (c, V) e^(logit - max), in place
    total = weights.sum(dim=-1)  # (c,)
    logp = picked - top - total.log()  # (c,) logit - logsumexp
    if not grad:
        return logp, None
    d = weights.div_(total[:, None]).neg_()  # (c, V) -softmax
    d[rows, target] += 1.0
    if capped is not None:
        d *= 1.0 - capped * capped
    return logp, d


def _logits_buffer(hidden: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
    """One (chunk, V) tensor for every chunk's logits (and their gradient, formed in place over them)."""
    return torch.empty((min(chunk, hidden.shape[0]), weight.shape[0]), dtype=weight.dtype, device=hidden.device)


class _HeadLogps(torch.autograd.Function):
    """log p(target) per token through the output layer, chunked (see module doc). Returns (N,) fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, delta, rows, target, softcap, chunk, dtype, mode):
        w = weight.to(dtype)
        d = delta.to(dtype) if delta is not None else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        keep_grad = mode == "frozen"  # d log p / d h formed here, backward only scales it
        kept = [] if mode == "keep" else None  # a trained layer's d log p / d logits per chunk, small enough to keep
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if keep_grad else None  # (N, H)
        drows = torch.empty((hidden.shape[0], rows.numel()), device=hidden.device) if keep_grad and rows is not None else None
        buffer = None if kept is not None else _logits_buffer(hidden, w, chunk)  # kept chunks need their own
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl].to(dtype)  # (c, H)
            logits, capped = _chunk_logits(h, w, bias, rows, d, softcap, buffer)  # (c, V)
            out[sl], grad = _logp_and_grad(logits, capped, target[sl], keep_grad or kept is not None)  # (c,), (c, V)
            if kept is not None:
                kept.append(grad)
            if keep_grad:
                g = grad.to(dtype)
                dh_chunk = g @ w  # (c, H)
                if rows is not None:  # the trained rows' weights are delta, not W
                    dh_chunk += g[:, rows] @ (d - w[rows])
                    drows[sl] = grad[:, rows]
                dh[sl] = dh_chunk.to(hidden.dtype)
        ctx.mode, ctx.softcap, ctx.chunk, ctx.dtype = mode, softcap, chunk, dtype
        ctx.kept = kept
        needs_hidden = mode in ("recompute", "keep") or drows is not None  # frozen mode keeps dh instead of hidden
        ctx.save_for_backward(hidden if needs_hidden else None, weight, bias, delta, rows, target, dh, drows)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, delta, rows, target, dh, drows = ctx.saved_tensors
        g = grad_out.float()  # (N,)
        grad_hidden = grad_weight = grad_bias = grad_delta = None
        if ctx.mode == "frozen":
            grad_hidden = (dh * g[:, None].to(dh.dtype)) if ctx.needs_input_grad[0] else None  # (N, H)
            if drows is not None and ctx.needs_input_grad[3]:
                grad_delta = ((drows * g[:, None]).T @ hidden.float()).to(delta.dtype)  # (k, H)
            return grad_hidden, None, None, grad_delta, None, None, None, None, None, None
        # "recompute"/"keep": a trained output layer; each chunk's d log p / d logits is rebuilt (or was kept).
        dtype, w = ctx.dtype, weight.to(ctx.dtype)
        d = delta.to(dtype) if delta is not None else None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and ctx.needs_input_grad[2] else None
        grad_delta = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device) if delta is not None and ctx.needs_input_grad[3] else None
        buffer = _logits_buffer(hidden, w, ctx.chunk) if ctx.kept is None else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            h = hidden[sl].to(dtype)  # (c, H)
            if ctx.kept is not None:  # kept by the forward
                grad = ctx.kept[start // ctx.chunk].mul_(g[sl, None])  # (c, V)
            else:
                logits, capped = _chunk_logits(h, w, bias, rows, d, ctx.softcap, buffer)  # (c, V)
                grad = _logp_and_grad(logits, capped, target[sl], True)[1].mul_(g[sl, None])  # (c, V)
            if grad_delta is not None:
                grad_delta.addmm_(grad[:, rows].T, h.float())
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            if rows is not None:
                dh_rows = grad[:, rows].to(dtype) @ d  # (c, H)
                grad[:, rows] = 0.0  # those columns' weights are delta, not W
            if grad_hidden is not None:
                gh = grad.to(dtype) @ w  # (c, H)
                grad_hidden[sl] = (gh + dh_rows if rows is not None else gh).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h.float())  # (V, H), accumulated in place
        ctx.kept = None  # scaled in place above: a second backward recomputes
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        if grad_delta is not None:
            grad_delta = grad_delta.to(delta.dtype)
        return grad_hidden, grad_weight, grad_bias, grad_delta, None, None, None, None, None, None


def default_chunk(vocab: int) -> int:
    """Tokens per output-layer chunk so that one chunk's fp32 logits hold CHUNK_ELEMENTS values."""
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


def head_logps(hidden: torch.Tensor, head: Head, target: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """log P(target) (N,) fp32 from final hidden states (N, H), `chunk` tokens at a time (None = default)."""
    chunk = chunk or default_chunk(head.vocab)
    pieces = -(-hidden.shape[0] // chunk)
    chunk = max(1, -(-hidden.shape[0] // max(pieces, 1)))  # as many chunks, evenly sized (no tiny last one)
    dtype = _compute_dtype(hidden, head.weight)
    trained = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    mode = "frozen" if not trained else "keep" if hidden.shape[0] * head.vocab <= KEEP_ELEMENTS else "recompute"
    if not torch.is_grad_enabled():
        mode = "none"
    return _HeadLogps.apply(hidden, head.weight, head.bias, head.delta, head.rows, target, head.softcap, chunk, dtype, mode)


def final_hidden(model, batch: Batch) -> torch.Tensor:
    """(R, L, H) final hidden states of a packed batch, through the model's own forward (so wrappers such as
    DDP see the call) with the shared-prompt mask, the packed positions and no logits."""
    lm = causal_lm(model)
    captured = []
    hook = lm.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
    split = {"orpo_spans": batch.spans} if lm.config._attn_implementation == SPLIT else {}  # to split_attention
    try:
        model(
            input_ids=batch.input_ids,
            attention_mask=model_mask(batch, lm.config, lm.get_input_embeddings().weight.dtype),
            position_ids=batch.position_ids,
            logits_to_keep=torch.empty(0, dtype=torch.long, device=batch.input_ids.device),
            use_cache=False,
            **split,
        )
    finally:
        hook.remove()
    return captured[-1]


def forward_logps(model, batch: Batch, chunk: int | None = None) -> torch.Tensor:
    """Per-token log-probs on the batch's grid (2b, W), fp32, for either layout."""
    if not batch.packed:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return token_logps(out.logits, batch.input_ids)  # (2b, T-1)
    hidden = final_hidden(model, batch)  # (R, L, H)
    scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.source)  # (N, H)
    logps = head_logps(scored, output_head(model), batch.target, chunk)  # (N,)
    grid = torch.zeros(batch.response.numel(), dtype=logps.dtype, device=logps.device)  # (2b*W,)
    return grid.scatter(0, batch.dest, logps).view(batch.response.shape)  # (2b, W)
