"""The memory model (training/memory.py), part by part, against direct counts on tiny models: parameters of a built
model, LoRA's trainable tensors, optimizer state bytes after one step, 4-bit weight bytes, and the activations
autograd keeps for one pass as a saved-tensor hook records them."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model_dir
from orpo.config import make_config
from orpo.model.load import load_model, load_tokenizer
from orpo.training.heldout import run_layout
from orpo.training.logps import forward_logps
from orpo.training.loss import Norm, orpo_loss
from orpo.training.memory import (
    Arch,
    Pass,
    Setup,
    lora_copies,
    optimizer_bytes,
    pass_bytes,
    peak,
    trainable_tensors,
    weight_bytes,
)
from orpo.training.plan import setup_for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Hidden 64 (4-bit blocks fit), untied output layer, GQA (4 heads, 2 key/value heads)."""
    return make_model_dir(tmp_path_factory.mktemp("memory_model"), chat=True, hidden=64)


def built(model_dir, **settings):
    config = make_config({"model.name_or_path": str(model_dir), "max_length": 256, "max_prompt_length": 128,
                          "optim": "adamw_torch", "gradient_checkpointing": False, **settings})
    tokenizer, new = load_tokenizer(config)
    return config, tokenizer, load_model(config, tokenizer, new)


def test_parameters_match_a_built_model(model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    for path in (model_dir, make_model_dir(tmp_path / "tied", chat=True, hidden=32, tied=True)):
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert Arch.from_config(config).params == sum(p.numel() for p in model.parameters())


def test_lora_tensors_match_peft(model_dir):
    config, _, model = built(model_dir, **{"lora.r": 8})
    arch = Arch.from_config(model.config)
    setup, _ = setup_for(config, arch, "cpu", None, 0)
    counted = sorted(p.numel() for p in model.parameters() if p.requires_grad)
    assert sorted(trainable_tensors(arch, setup)) == counted


def test_full_fine_tuning_trains_every_weight(model_dir):
    config, _, model = built(model_dir, **{"lora.enabled": False})
    arch = Arch.from_config(model.config)
    setup, _ = setup_for(config, arch, "cpu", None, 0)
    assert sum(trainable_tensors(arch, setup)) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit"])
def test_optimizer_states_after_one_step(model_dir, optim):
    from orpo.training.optim import make_optimizer

    if optim == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    config, _, model = built(model_dir, optim=optim, **{"lora.enabled": False})
    optimizer = make_optimizer(config, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1e-3
    try:
        optimizer.step()
    except (RuntimeError, NotImplementedError) as exc:  # bitsandbytes without a CPU 8-bit optimizer
        pytest.skip(f"{optim} does not step on this CPU: {exc}")
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    predicted = optimizer_bytes(sizes, 4, optim)
    assert abs(predicted - state_bytes(optimizer)) <= 0.01 * predicted


def test_four_bit_weights(model_dir):
    pytest.importorskip("bitsandbytes")
    config, _, model = built(model_dir, **{"model.load_in_4bit": True, "model.bnb_4bit_compute_dtype": "float32"})
    arch = Arch.from_config(model.config)
    setup, _ = setup_for(config, arch, "cpu", None, 0)
    counted = 0
    for name, p in model.named_parameters():
        if "lora_" in name or "trainable_tokens" in name:
            continue
        counted += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            counted += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                counted += state.state2.absmax.numel() * state.state2.absmax.element_size()
    predicted, notes = weight_bytes(arch, setup)
    assert "4-bit" in notes[0]
    assert abs(predicted - counted) <= 0.03 * counted


def kept_by_autograd(model, batch) -> int:
    """Bytes of every distinct storage autograd keeps for the backward of one pass (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = forward_logps(model, batch)
        orpo_loss(logps, batch.response, batch.nll, 0.1, Norm(float(batch.nll.sum()), float(batch.pairs)))
    return sum(seen.values())


@pytest.mark.parametrize("layout", ["packed", "plain"])
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_kept_for_one_pass(model_dir, layout, lora, checkpointing):
    """Per-layer coefficients, attention, LoRA and the output layer against what autograd really keeps: within
    15% (the tiny model's small per-layer tensors weigh more than in a real one)."""
    config, tokenizer, model = built(model_dir, layout=layout, gradient_checkpointing=checkpointing, **{"lora.enabled": lora})
    model.train()
    lengths = [(40, 70, 50), (25, 90, 60), (60, 30, 30)]
    records = [{"prompt_ids": [5 + i % 50] * p, "chosen_ids": [7 + i % 40] * c, "rejected_ids": [9 + i % 30] * n}
               for i, (p, c, n) in enumerate(lengths)]
    layout_ = run_layout(config, model, tokenizer, 3, torch.device("cpu"))
    batch = layout_.batches([records])[0]
    measured = kept_by_autograd(model, batch)
    arch = Arch.from_config(model.config)
    setup, _ = setup_for(config, arch, "cpu", None, 0)
    rows, length = batch.input_ids.shape
    seqs = {len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in records} | {len(r["prompt_ids"]) + len(r["rejected_ids"]) for r in records}
    pairs = tuple((p, c, n) for row in batch.spans for _, p, c, n in row) if batch.packed else tuple(lengths)
    p = Pass(rows, length, pairs, packed=batch.packed, padded=len(seqs) > 1)
    kept, head, _ = pass_bytes(arch, setup, p)
    if not lora and batch.packed:  # a trained output layer's d log p / d logits sits in the autograd context
        head -= p.scored * arch.vocab * 4  # (logps._HeadLogps keeps it there), where no saved-tensor hook sees it
    predicted = kept + head + lora_copies(arch, setup)
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


def test_output_layer_dominates_plain_with_a_large_vocabulary():
    """Llama 3's vocabulary: the plain layout's logits outweigh the layers; the packed layout's chunk does not."""
    arch = Arch("llama", 32, 4096, 14336, 32, 8, 128, 128_256, False)
    setup = Setup(gradient_checkpointing=True, residual_bytes=4, linear_bytes=2, weight_bytes=2, kernel="sdpa")
    plain = Pass(4, 1024, ((512, 512, 512),) * 2, packed=False)
    packed = Pass(2, 1536, ((512, 512, 512),) * 2, packed=True)
    kept, head, _ = pass_bytes(arch, setup, plain)
    assert head > kept
    kept, head, _ = pass_bytes(arch, setup, packed)
    assert head < kept / 4


def live_tensor_bytes(exclude: set[int]) -> int:
    """Bytes of every distinct storage a live Python tensor object holds (closures included), weights excluded."""
    import gc

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
            try:
                storage = obj.untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:  # fake or functional tensors other tests' compiles left behind: no memory
                continue
            if ptr not in exclude:
                seen.setdefault(ptr, storage.nbytes())
    return sum(seen.values())


def test_checkpointing_frees_the_fused_layers_activations(model_dir):
    """Under gradient checkpointing nothing of a layer's inside outlives its forward: the fused layers' rebuilds
    read the norm's and the gated product's tensors through their backward nodes, not through closures holding
    them (which kept gate and up of every layer alive: most of the activations checkpointing exists to free)."""
    config, tokenizer, model = built(model_dir, layout="packed", gradient_checkpointing=True, max_tokens_per_batch=4096)
    model.train()
    records = [{"prompt_ids": [5] * 200, "chosen_ids": [7] * 300, "rejected_ids": [9] * 300}]
    batch = run_layout(config, model, tokenizer, 1, torch.device("cpu")).batches([records])[0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    before = live_tensor_bytes(weights)
    logps = forward_logps(model, batch)
    loss, _ = orpo_loss(logps, batch.response, batch.nll, 0.1, Norm(float(batch.nll.sum()), float(batch.pairs)))
    held = live_tensor_bytes(weights) - before
    arch = Arch.from_config(model.config)
    setup, _ = setup_for(config, arch, "cpu", None, 0)
    p = Pass(1, 800, ((200, 300, 300),), packed=True)
    kept, head, _ = pass_bytes(arch, setup, p)
    assert held < 1.3 * (kept + head), (held, kept + head)
    loss.backward()  # the rebuilds unpack each checkpointed tensor once
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_full_fine_tuning_peak_adds_up_on_a_gpu():
    """Full fine-tuning on a GPU: the gradient reported is the one held at the chosen moment (a step's first pass
    grows it as the activations go), so the parts add up to the largest pass's total, not more."""
    arch = Arch("llama", 4, 256, 768, 4, 2, 64, 32_000, False)
    setup = Setup(lora=False, gradient_checkpointing=False, residual_bytes=4, linear_bytes=4, weight_bytes=4, kernel="sdpa")
    one = Pass(2, 256, ((128, 128, 128),), packed=False, padded=False)
    parts = peak(arch, setup, [[one]])
    kept, head, transient = pass_bytes(arch, setup, one)
    grads = sum(trainable_tensors(arch, setup)) * 4
    assert parts.gradients == max(0, grads - kept - head)
    assert parts.total == parts.weights + parts.optimizer + kept + head + transient + parts.gradients
    assert peak(arch, setup, []).gradients == grads  # no passes: the whole gradient
