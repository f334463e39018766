"""Tests for orpo.model.fast.attention: the packed layout through the own forward of every model type it claims, on tiny
random configs (sliding windows shorter than the sequences, so windows matter), with sdpa and eager, against
the plain layout; and clear refusals for what it cannot serve."""

from __future__ import annotations

import random

import pytest
import torch
from torch.testing import assert_close

from orpo.config import ConfigError, load_config
from orpo.model.fast.attention import PACKED_MODEL_TYPES, _window, packed_problem, register_split
from orpo.training.layout import SPLIT, Layout, pack, pair_length
from orpo.training.logps import check_packed, forward_logps

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 5  # shorter than most sequences below
EXTRA = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "mixtral": {"sliding_window": WINDOW, "num_local_experts": 2, "num_experts_per_tok": 1},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "layer_types": ["full_attention", "sliding_attention"]},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "head_dim": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3_moe": {"head_dim": 8, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
               "layer_types": ["sliding_attention", "full_attention"]},  # logit softcap 30, attention softcap 50
    "gemma3_text": {"head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
                    "layer_types": ["sliding_attention", "full_attention"], "final_logit_softcapping": 30.0},
    "phi3": {"sliding_window": WINDOW},
    "olmo2": {},
}


def tiny_model(kind: str, kernel: str):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING[kind](**COMMON, **EXTRA[kind])
    register_split()
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=kernel).float()
    except ValueError as exc:  # Gemma 2 has no sdpa (attention soft-capping)
        pytest.skip(f"{kind} has no {kernel} in transformers: {str(exc)[:80]}")
    return model.eval()  # no dropout: both layouts compute one function


def random_pairs(n=6, seed=0) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, 96) for _ in range(rng.randint(lo, hi))]

    pairs = [{"prompt_ids": [1] + ids(2, 12), "chosen_ids": ids(1, 10), "rejected_ids": ids(1, 10)} for _ in range(n)]
    return pairs + [{"prompt_ids": [1, 5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]},  # short pairs share rows
                    {"prompt_ids": [1, 9], "chosen_ids": [10, 11, 12], "rejected_ids": [13, 14]}]


def logps_and_grads(model, batches, records, layout):
    """Per-pair token log-probs (each pair's chosen and rejected grid rows, in step order) and the gradient
    of their sum with respect to every weight."""
    order = iter(list(range(len(records))) if layout.kind == "plain" else
                 [i for rows in pack([pair_length(r) for r in records], layout.max_tokens, layout.one_row) for row in rows for i in row])
    rows, total = {}, 0.0
    for batch in batches:
        logps = forward_logps(model, batch, chunk=5)  # (2b, W)
        mask = batch.response | batch.nll
        total = total + (logps * mask).sum()
        for i in range(batch.pairs):
            rows[next(order)] = (logps[i][mask[i]], logps[batch.pairs + i][mask[batch.pairs + i]])
    grads = torch.autograd.grad(total, [p for p in model.parameters()], allow_unused=True)
    return [rows[i] for i in range(len(records))], grads


@pytest.mark.parametrize("kernel", ["sdpa", "eager", SPLIT])
@pytest.mark.parametrize("kind", PACKED_MODEL_TYPES)
def test_packed_equals_plain_on_every_supported_model(kind, kernel, monkeypatch):
    model = tiny_model(kind, kernel)
    assert packed_problem(model.config) is None
    check_packed(model)
    records = random_pairs()
    plain = Layout("plain", 0, True, 0)
    packed = Layout("packed", 0, True, 48, one_row=kernel == SPLIT)
    want, want_grads = logps_and_grads(model, plain.batches([records]), records, plain)
    batches = packed.batches([records])
    assert len(batches) > 1  # several passes, one of them with several rows, one row with two pairs
    assert any(b.input_ids.shape[0] > 1 or kernel == SPLIT for b in batches) and any(int(b.segment.max()) > 0 for b in batches)
    if kernel == SPLIT:  # the split runs wherever no window cuts a pair: count the pieces it computes
        pieces = []
        real = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: pieces.append(k.get("is_causal")) or real(*a, **k))
    got, got_grads = logps_and_grads(model, batches, records, packed)
    if kernel == SPLIT:
        types = getattr(model.config, "layer_types", None) or [None] * model.config.num_hidden_layers
        unwindowed = sum(_window(model.config, t) is None for t in types)  # windows here cut pairs: dense mask
        assert pieces.count(True) == unwindowed * len(records)  # one causal call per pair and such layer
    for (gc, gr), (wc, wr) in zip(got, want, strict=True):
        assert_close(gc, wc, rtol=1e-5, atol=1e-5) and assert_close(gr, wr, rtol=1e-5, atol=1e-5)
    scale = max(float(g.abs().max()) for g in want_grads if g is not None)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:
            assert g is None or float(g.abs().max()) == 0
        else:
            assert_close(g, w, rtol=1e-5, atol=1e-5 * scale)


def test_windows_matter_in_this_test():
    """Guard for the test above: a window of 5 changes the log-probs of sequences longer than 5."""
    records = random_pairs()
    with torch.no_grad():
        short = forward_logps(tiny_model("mistral", "sdpa"), Layout("plain", 0, True, 0).batches([records])[0])
        model = tiny_model("mistral", "sdpa")
        model.config.sliding_window = None
        full = forward_logps(model, Layout("plain", 0, True, 0).batches([records])[0])
    assert (short - full).abs().max() > 1e-3


def test_models_and_kernels_it_cannot_serve_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="model type 'gpt2' is not one the packed layout is verified on.*set layout=plain"):
        check_packed(gpt2)
    llama = tiny_model("llama", "sdpa")
    llama.config._attn_implementation = "flash_attention_2"
    assert "attention kernel 'flash_attention_2' cannot take the shared-prompt mask" in packed_problem(llama.config)
    with pytest.raises(ConfigError, match="layout=packed needs an attention kernel that takes a mask"):
        load_config(None, ["model.attn_implementation=flash_attention_2"])
    assert load_config(None, ["model.attn_implementation=flash_attention_2", "layout=plain"]).layout == "plain"


def test_training_an_unsupported_model_stops_before_any_step(tmp_path, pairs_file):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from conftest import make_tokenizer, tiny_overrides
    from orpo.training.loop import train

    tokenizer = make_tokenizer(chat=True)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    assert AutoTokenizer.from_pretrained(tmp_path / "gpt2").chat_template
    with pytest.raises(ValueError, match="set layout=plain"):
        train(load_config(None, tiny_overrides(tmp_path / "gpt2", pairs_file, tmp_path / "run")))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    train(load_config(None, tiny_overrides(tmp_path / "gpt2", pairs_file, tmp_path / "plain", layout="plain", max_steps=1)))
    assert (tmp_path / "plain" / "final").is_dir()


@pytest.mark.slow
def test_flex_attention_block_mask_equals_plain():
    """FlexAttention (the CUDA option) with the BlockMask, forward only: torch runs it on the CPU only
    without gradients, compiled (about a minute)."""
    records = random_pairs()
    with torch.no_grad():
        want = forward_logps(tiny_model("gemma2", "eager"), Layout("plain", 0, True, 0).batches([records])[0])
        flex = tiny_model("gemma2", "flex_attention")
        got = forward_logps(flex, Layout("packed", 0, True, 1000, one_row=True).batches([records])[0])
    order = [i for rows in pack([pair_length(r) for r in records], 1000, one_row=True) for row in rows for i in row]
    b = len(records)
    index = torch.tensor(order + [b + i for i in order])
    w = min(want.shape[1], got.shape[1])
    mask = Layout("plain", 0, True, 0).batches([records])[0].response[index][:, :w]
    assert_close(got[:, :w][mask], want[index][:, :w][mask], rtol=1e-4, atol=1e-4)


def test_the_run_uses_the_split_on_a_cpu_only_for_the_packed_layout(chat_model_dir):
    """run_layout: an sdpa model goes pair by pair on a CPU with the packed layout (one row per pass); the
    plain layout, eager and other devices keep their kernel."""
    from conftest import make_tokenizer
    from orpo.training.heldout import run_layout

    tokenizer = make_tokenizer(chat=True)
    for layout, kernel, device, want in [("packed", "sdpa", "cpu", SPLIT), ("plain", "sdpa", "cpu", "sdpa"),
                                         ("packed", "eager", "cpu", "eager"), ("packed", "sdpa", "cuda", "sdpa")]:
        model = tiny_model("llama", kernel)
        config = load_config(None, [f"layout={layout}", f"model.attn_implementation={kernel}"])
        plan = run_layout(config, model, tokenizer, 2, torch.device(device))
        assert model.config._attn_implementation == want
        assert plan.one_row == (want == SPLIT)
