"""Tests for orpo.training.logps: the chunked output layer against full logits, and the packed layout against the
plain layout through real (tiny) models: per-pair log-probs, loss, every metric and every gradient.

The plain layout (full logits, [chosen; rejected] rows) is the reference; the packed layout must equal it
within 1e-5 relative in fp32. Each parity test also checks that the packed path really ran (packed inputs,
fewer tokens than the plain rows, no full logits), so it fails when the fast path is switched off.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

from orpo.config import load_config
from orpo.data.pairs import TokenSpec, end_of_turn_id, to_messages, tokenize_pair
from orpo.model.load import load_model, load_tokenizer
from orpo.training.layout import Layout, pack, packed_batch, pair_length, plain_batch
from orpo.training.logps import Head, default_chunk, forward_logps, head_logps, output_head
from orpo.training.loop import global_norm
from orpo.training.loss import add_stats, finish_metrics, orpo_loss
from test_loss import METRICS, ONE_PROCESS

# ---------------------------------------------------------------- 1. the chunked output layer


def reference_logps(hidden, weight, bias, rows, delta, softcap, target):
    """Full (N, V) logits through autograd, log-softmax in fp32: what the model's own head gives."""
    w = weight if rows is None else weight.index_copy(0, rows, delta)
    logits = (hidden @ w.T).float()  # (N, V)
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(1, target[:, None]).squeeze(1)  # (N,)


def head_case(trained: bool, bias: bool, rows: bool, softcap, n=47, h=12, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)  # (N, H)
    weight = torch.randn(v, h, generator=g).requires_grad_(trained)  # (V, H)
    b = torch.randn(v, generator=g).requires_grad_(trained) if bias else None
    idx = torch.tensor([7, 50, 3]) if rows else None
    delta = torch.randn(3, h, generator=g, requires_grad=True) if rows else None
    target = torch.randint(0, v, (n,), generator=g)
    target[:3] = torch.tensor([7, 50, 3])  # the trained rows are scored too
    return hidden, weight, b, idx, delta, softcap, target


@pytest.mark.parametrize(("trained", "keep"), [(False, True), (True, True), (True, False)],
                         ids=["frozen-head", "trained-head-kept", "trained-head-recomputed"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rows", [False, True], ids=["", "new-rows"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["", "softcap"])
@pytest.mark.parametrize("chunk", [8, 1000])
def test_head_logps_equal_full_logits(trained, keep, bias, rows, softcap, chunk, monkeypatch):
    """N = 47 tokens in chunks of 8 (last one 7) or one chunk: values and the gradients of hidden states,
    weight, bias and the trained rows equal full logits through autograd (fp32, 1e-5); a trained layer's
    d log p / d logits kept by the forward or recomputed by the backward."""
    import orpo.training.logps

    if not keep:
        monkeypatch.setattr(orpo.training.logps, "KEEP_ELEMENTS", 0)
    hidden, weight, b, idx, delta, cap, target = head_case(trained, bias, rows, softcap)
    upstream = torch.linspace(-1.0, 2.0, hidden.shape[0])  # (N,) any incoming gradient
    inputs = [t for t in (hidden, weight, b, delta) if t is not None and t.requires_grad]
    want = reference_logps(hidden, weight, b, idx, delta, cap, target)
    want_grads = torch.autograd.grad((want * upstream).sum(), inputs)
    got = head_logps(hidden, Head(weight, b, idx, delta, cap), target, chunk)
    got_grads = torch.autograd.grad((got * upstream).sum(), inputs)
    assert got.dtype == torch.float32
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_head_logps_under_bf16_autocast_match_the_model_head():
    """Under bf16 autocast the matmul runs in bf16 as F.linear's would, the log-softmax in fp32."""
    hidden, weight, _, _, _, _, target = head_case(False, False, False, None, n=40, h=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.nn.functional.linear(hidden, weight).float().log_softmax(-1).gather(1, target[:, None]).squeeze(1)
        got = head_logps(hidden, Head(weight, None, None, None, None), target, 16)
    assert got.dtype == torch.float32
    assert_close(got, want, rtol=0, atol=2e-2)
    fp32 = reference_logps(hidden, weight, None, None, None, None, target)
    assert (got - fp32).abs().max() > 0  # it really ran in bf16


@pytest.mark.parametrize("trained", [False, True], ids=["frozen-head", "trained-head"])
def test_head_saves_nothing_of_vocabulary_size(trained, monkeypatch):
    """The autograd graph keeps no (tokens x vocabulary) tensor: memory is O(chunk x V) during the call
    and O(N x H) after it (full logits would keep N x V = 2,000 x 5,000 floats), once N x V is past what a
    trained layer may keep (KEEP_ELEMENTS, here lowered under N x V)."""
    import orpo.training.logps

    n, h, v = 2000, 16, 5000
    monkeypatch.setattr(orpo.training.logps, "KEEP_ELEMENTS", n * v - 1)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=trained)
    target = torch.randint(0, v, (n,))
    sizes = []

    def keep(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = head_logps(hidden, Head(weight, None, None, None, None), target, 64)
    assert max(sizes) <= max(n * h, v * h) < n * v
    out.sum().backward()
    assert torch.isfinite(hidden.grad).all()


def test_default_chunk_holds_16m_logits():
    assert default_chunk(49152) == 341 and default_chunk(128256) == 130 and default_chunk(10**9) == 16


# ---------------------------------------------------------------- 2. packed vs plain through real models

CASES = [  # very different lengths, multi-turn prompts, a system turn, prompts and responses cut
    {"prompt": "Add 2 and 3.", "chosen": "5.", "rejected": "The answer is 6. The answer is 6, not 5."},
    {"prompt": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello there!"},
                {"role": "assistant", "content": "How are you today?"}, {"role": "user", "content": "What colour is snow?"}],
     "chosen": [{"role": "assistant", "content": "Snow is white."}],
     "rejected": [{"role": "assistant", "content": "Snow is green. The sky is green. Grass is green and snow is white."}]},
    {"prompt": "What is the capital of France? " * 8 + "Answer briefly.", "chosen": "The capital of France is Paris. " * 6,
     "rejected": "The sky is blue. " * 9},
    {"prompt": "Write a haiku about the sea.", "chosen": "Waves fold into foam, salt wind carries the gull's cry.", "rejected": "The sky is blue."},
    {"prompt": "Hello there!", "chosen": "How are you today?", "rejected": "I am fine, thank you."},
    {"prompt": "What colour is grass?", "chosen": "Grass is green.", "rejected": "Grass is white. " * 12},
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "The capital of France is green."},
    {"prompt": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 3 and 3?"}],
     "chosen": [{"role": "assistant", "content": "The answer is 6."}], "rejected": [{"role": "assistant", "content": "5"}]},
]
MAX_LENGTH, MAX_PROMPT = 48, 24


def tokenized(tokenizer) -> list[dict]:
    spec = TokenSpec(tokenizer.bos_token_id if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else None,
                     end_of_turn_id(tokenizer), MAX_LENGTH, MAX_PROMPT, True)
    records = [tokenize_pair(to_messages(c), tokenizer, spec) for c in CASES]
    full = [tokenize_pair(to_messages(c), tokenizer, TokenSpec(spec.bos_id, spec.end_of_turn_id, 10_000, 5_000, True)) for c in CASES]
    assert all(not r["drop"] for r in records)
    assert any(len(f["prompt_ids"]) > len(r["prompt_ids"]) for f, r in zip(full, records, strict=True))  # a prompt cut
    assert any(len(f["chosen_ids"]) > len(r["chosen_ids"]) or len(f["rejected_ids"]) > len(r["rejected_ids"])
               for f, r in zip(full, records, strict=True))  # a response cut at max_length
    lengths = [pair_length(r) for r in records]
    assert max(lengths) > 2 * min(lengths)
    return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in records]


def build(model_dir, **overrides):
    """Tokenizer and model exactly as training builds them (LoRA dropout 0 so both layouts see one function)."""
    items = {"model.name_or_path": str(model_dir), "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0,
             "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT, **overrides}
    config = load_config(None, [f"{k}={v}" for k, v in items.items()])
    torch.manual_seed(0)
    tokenizer, new_ids = load_tokenizer(config)
    model = load_model(config, tokenizer, new_ids)
    if config.lora.enabled:  # LoRA B starts at zero; move it so the adapter matters in the comparison
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    return model, tokenizer


def run_step(model, groups, layout: Layout, device: torch.device | None = None):
    """One optimizer step's forward/backward: (loss, metrics, {param: grad}, per-pair mean log-probs in
    step order, the batches), its batches moved to `device` when given."""
    batches = [b.to(device) for b in layout.batches(groups)] if device else layout.batches(groups)
    norm = global_norm(batches, ONE_PROCESS)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    total, stats, means = 0.0, None, {}
    records = [r for g in groups for r in g]
    order = iter(_grid_order(records, layout))
    for batch in batches:
        logps = forward_logps(model, batch, chunk=7)  # (2b, W) an odd chunk: several chunks per pass
        loss, s = orpo_loss(logps, batch.response, batch.nll, 0.1, norm)
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True):
            if g is not None:
                grads[name] += g
        total, stats = total + loss.item(), add_stats(stats, s)
        mean = ((logps * batch.response).sum(-1) / batch.response.sum(-1)).detach()  # (2b,)
        for i in range(batch.pairs):
            means[next(order)] = (float(mean[i]), float(mean[batch.pairs + i]))
    return total, finish_metrics(stats, 0.1), grads, [means[i] for i in range(len(records))], batches


def _grid_order(records, layout: Layout) -> list[int]:
    """Step-order index of each pair as the layout places them on its grids."""
    if layout.kind == "plain":
        return list(range(len(records)))
    plan = pack([pair_length(r) for r in records], layout.max_tokens, layout.one_row)
    return [i for rows in plan for row in rows for i in row]


def assert_same_step(model, groups, nll_on_prompt, pad_id, max_tokens=40):
    """The packed step equals the plain step: per-pair log-probs, loss, every metric, every gradient."""
    plain = run_step(model, groups, Layout("plain", pad_id, nll_on_prompt, 0))
    packed = run_step(model, groups, Layout("packed", pad_id, nll_on_prompt, max_tokens))
    assert all(b.packed for b in packed[4]) and len(packed[4]) > 1  # the fast path ran, over several passes
    assert sum(b.input_ids.numel() for b in packed[4]) < sum(b.input_ids.numel() for b in plain[4])
    assert_close(torch.tensor(packed[3]), torch.tensor(plain[3]), rtol=1e-5, atol=1e-6)
    assert packed[0] == pytest.approx(plain[0], rel=1e-5)
    for key in METRICS:
        assert packed[1][key] == pytest.approx(plain[1][key], rel=1e-5, abs=1e-6), key
    scale = max(float(g.abs().max()) for g in plain[2].values())
    assert scale > 0
    for name, want in plain[2].items():
        assert_close(packed[2][name], want, rtol=1e-5, atol=1e-5 * scale, msg=name)


def groups_of(records, ga):
    per = len(records) // ga
    return [records[i * per : (i + 1) * per] for i in range(ga)]


@pytest.mark.parametrize("ga", [1, 4])
@pytest.mark.parametrize("nll_on_prompt", [True, False])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_packed_equals_plain_lora(chat_model_dir, tied_model_dir, ga, nll_on_prompt, tied):
    model, tokenizer = build(tied_model_dir if tied else chat_model_dir)
    assert (output_head(model).weight is model.get_input_embeddings().weight) == tied
    assert_same_step(model, groups_of(tokenized(tokenizer), ga), nll_on_prompt, tokenizer.pad_token_id)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("ga", [1, 4])
def test_packed_equals_plain_full_finetuning(chat_model_dir, tied_model_dir, tied, ga):
    """Every weight trains, the output layer too (recomputed per chunk in the backward)."""
    model, tokenizer = build(tied_model_dir if tied else chat_model_dir, **{"lora.enabled": False})
    assert output_head(model).weight.requires_grad
    assert_same_step(model, groups_of(tokenized(tokenizer), ga), True, tokenizer.pad_token_id)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_packed_equals_plain_chatml_setup(base_model_dir, tied_base_model_dir, tied):
    """A base model with ChatML set up: the new tokens' rows train (peft trainable tokens), and are scored
    (<|im_end|> closes every response that was not cut)."""
    model, tokenizer = build(tied_base_model_dir if tied else base_model_dir, **{"model.chat_template": "chatml"})
    head = output_head(model)
    assert head.rows is not None and head.delta.requires_grad
    records = tokenized(tokenizer)
    assert sum(int(head.rows[1]) in r["chosen_ids"] for r in records) >= 6  # all but responses cut short
    assert_same_step(model, groups_of(records, 2), True, tokenizer.pad_token_id)


def test_packed_equals_plain_qlora(wide_model_dir):
    """4-bit NF4 base (fp32 compute on the CPU) with LoRA."""
    pytest.importorskip("bitsandbytes")
    model, tokenizer = build(wide_model_dir, **{"model.load_in_4bit": True, "model.bnb_4bit_compute_dtype": "float32"})
    assert any("4bit" in type(m).__name__ for m in model.modules())
    assert_same_step(model, groups_of(tokenized(tokenizer), 2), True, tokenizer.pad_token_id, max_tokens=60)


def test_packing_does_not_change_the_step(chat_model_dir):
    """Budgets from one pair per pass to everything in one pass give the same loss and gradients."""
    model, tokenizer = build(chat_model_dir)
    groups = groups_of(tokenized(tokenizer), 2)
    steps = [run_step(model, groups, Layout("packed", tokenizer.pad_token_id, True, budget)) for budget in (16, 64, 10_000)]
    assert [len(s[4]) for s in steps][0] == 8 and len(steps[-1][4]) == 1
    for other in steps[1:]:
        assert other[0] == pytest.approx(steps[0][0], rel=1e-5)
        for name, want in steps[0][2].items():
            assert_close(other[2][name], want, rtol=1e-5, atol=1e-7, msg=name)


def test_packed_forward_builds_no_full_logits(chat_model_dir):
    """The model's own output layer sees no tokens in the packed layout (logits_to_keep is empty)."""
    model, tokenizer = build(chat_model_dir)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[-2]))
    try:
        batch = Layout("packed", tokenizer.pad_token_id, True, 1000).batches([tokenized(tokenizer)])[0]
        forward_logps(model, batch)
        assert seen == [0]
        forward_logps(model, plain_batch(tokenized(tokenizer), tokenizer.pad_token_id, True))
        assert seen[-1] > 0
    finally:
        handle.remove()


def test_packed_batch_row_order_is_the_grid_order(chat_model_dir):
    """packed_batch puts pair i of its rows on grid rows i and b+i: per-pair values follow the rows."""
    model, tokenizer = build(chat_model_dir)
    records = tokenized(tokenizer)[:3]
    with torch.no_grad():
        a = forward_logps(model, packed_batch([[records[0], records[1]], [records[2]]], tokenizer.pad_token_id, True))
        b = forward_logps(model, packed_batch([[records[2]], [records[1], records[0]]], tokenizer.pad_token_id, True))
    w = min(a.shape[1], b.shape[1])
    assert_close(a[0, :w], b[2, :w], rtol=1e-5, atol=1e-6) and assert_close(a[3, :w], b[5, :w], rtol=1e-5, atol=1e-6)


def test_packed_matches_plain_under_bf16_autocast(chat_model_dir):
    """bf16 autocast (matmuls in bf16, log-softmax and the loss in fp32): the layouts agree to bf16 precision,
    and the packed log-probs really differ from fp32 ones (the autocast reached the chunked head)."""
    model, tokenizer = build(chat_model_dir)
    groups, pad = groups_of(tokenized(tokenizer), 2), tokenizer.pad_token_id
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = run_step(model, groups, Layout("plain", pad, True, 0))
        packed = run_step(model, groups, Layout("packed", pad, True, 40))
    fp32 = run_step(model, groups, Layout("packed", pad, True, 40))
    assert_close(torch.tensor(packed[3]), torch.tensor(plain[3]), rtol=0, atol=5e-2)
    assert (torch.tensor(packed[3]) - torch.tensor(fp32[3])).abs().max() > 1e-4
    assert packed[0] == pytest.approx(plain[0], rel=2e-2)
    for key in ("nll_loss", "logps/chosen", "logps/rejected", "log_odds_chosen"):
        assert packed[1][key] == pytest.approx(plain[1][key], rel=5e-2, abs=5e-2), key
    scale = max(float(g.abs().max()) for g in plain[2].values())
    for name, want in plain[2].items():
        assert_close(packed[2][name], want, rtol=0, atol=5e-2 * scale, msg=name)


# ---------------------------------------------------------------- 3. on a GPU (bench/gpu/check.py runs these)


def gpu_or_dry_run(kernel: str) -> torch.device:
    """CUDA when there is one. Without: the CPU inside bench/gpu's dry run (ORPO_GPU_DRY_RUN=1), so that the
    test's code has run before a GPU machine runs it; flex_attention trains on CUDA only."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("ORPO_GPU_DRY_RUN") == "1" and kernel != "flex_attention":
        return torch.device("cpu")
    pytest.skip("needs CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize(("kernel", "qlora"), [("sdpa", False), ("flex_attention", False), ("sdpa", True)],
                         ids=["sdpa", "flex_attention", "sdpa-qlora"])
def test_packed_matches_plain_in_bf16_on_the_gpu(wide_model_dir, kernel, qlora, record_property):
    """bf16 autocast on CUDA, as training runs there: the packed layout through sdpa's boolean mask or
    flex_attention's block mask (and a 4-bit NF4 base with bf16 compute) against the plain layout through sdpa,
    within the tolerances of the CPU's bf16 test (test_packed_matches_plain_under_bf16_autocast)."""
    device = gpu_or_dry_run(kernel)
    if qlora:
        pytest.importorskip("bitsandbytes")
    extra = {"model.load_in_4bit": True, "model.bnb_4bit_compute_dtype": "bfloat16"} if qlora else {}
    plain_model, tokenizer = build(wide_model_dir, **{"model.attn_implementation": "sdpa", **extra})
    packed_model, _ = build(wide_model_dir, **{"model.attn_implementation": kernel, **extra})
    for model in (plain_model, packed_model):  # (a 4-bit model is placed on the GPU as it loads)
        if next(model.parameters()).device.type != device.type:
            model.to(device)
    assert causal_lm_kernel(packed_model) == kernel
    groups, pad = groups_of(tokenized(tokenizer), 2), tokenizer.pad_token_id
    with torch.autocast(device.type, dtype=torch.bfloat16):
        plain = run_step(plain_model, groups, Layout("plain", pad, True, 0), device)
        packed = run_step(packed_model, groups, Layout("packed", pad, True, 40), device)
    assert all(b.packed for b in packed[4]) and len(packed[4]) > 1
    logp_diff = float((torch.tensor(packed[3]) - torch.tensor(plain[3])).abs().max())
    scale = max(float(g.abs().max()) for g in plain[2].values())
    grad_diff = max(float((packed[2][n] - w).abs().max()) for n, w in plain[2].items()) / scale
    record_property("max_abs_mean_logp_diff", logp_diff)
    record_property("max_grad_diff_share", grad_diff)
    print(f"{kernel}{' qlora' if qlora else ''} on {device}: max |mean log-prob diff| {logp_diff:.2e}, "
          f"max |grad diff| {grad_diff:.2e} of the largest gradient, loss {packed[0]:.5f} vs {plain[0]:.5f}")
    assert_close(torch.tensor(packed[3]), torch.tensor(plain[3]), rtol=0, atol=5e-2)
    assert packed[0] == pytest.approx(plain[0], rel=2e-2)
    for key in ("nll_loss", "logps/chosen", "logps/rejected", "log_odds_chosen"):
        assert packed[1][key] == pytest.approx(plain[1][key], rel=5e-2, abs=5e-2), key
    for name, want in plain[2].items():
        assert_close(packed[2][name], want, rtol=0, atol=5e-2 * scale, msg=name)


def causal_lm_kernel(model) -> str:
    from orpo.training.logps import causal_lm

    return causal_lm(model).config._attn_implementation
