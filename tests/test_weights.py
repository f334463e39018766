"""after.weights: the merged model streamed tensor by tensor equals peft's merge_and_unload, and what cannot be
streamed falls back to the whole model in memory, saying why."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from conftest import PAIRS, tiny_overrides, write_jsonl
from orpo.cli import main
from orpo.config import load_config

# fixture name -> (tied output layer, ChatML tokens added to a base without a chat template)
BASES = {"chat_model_dir": (False, False), "tied_model_dir": (True, False), "base_model_dir": (False, True),
         "tied_base_model_dir": (True, True)}


def train_run(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(model_dir, data, out, max_steps=2, learning_rate=0.05,
                                          eval_on_start="false", eval_steps="null")]) == 0
    return out


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
    """fixture name -> a 2-step LoRA run on that tiny base (lr 0.05, so that the adapter moves the weights),
    each trained once for the module."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = train_run(request.getfixturevalue(name), tmp_path_factory.mktemp(name))
        return runs[name]

    return get


@pytest.fixture(params=list(BASES))
def run(request, trained):
    return request.param, trained(request.param)


def peft_merged(run_dir):
    """The reference: base in fp32 (resized as training resized it) + the adapter, merged by peft."""
    from peft import PeftModel

    from orpo.model.load import load_base, load_tokenizer

    config = load_config(run_dir / "config.yaml")
    tokenizer, new_ids = load_tokenizer(config)
    base = load_base(config, tokenizer, new_ids, dtype=torch.float32, quantized=False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    return PeftModel.from_pretrained(base, run_dir / "final").merge_and_unload(), before


def test_streamed_weights_equal_peft_merge_and_unload(run):
    """Every streamed tensor equals peft's merged one exactly (fp32), names and shapes complete; the tied output
    layer is left out (it is the embeddings); the adapter did change the LoRA targets and, where ChatML was
    added, the new token rows, so the equality is not that of two copies of the base."""
    from orpo.after.runs import resolve
    from orpo.after.weights import merged_weights

    name, run_dir = run
    tied, chatml = BASES[name]
    weights, _ = merged_weights(resolve(str(run_dir)))
    model, base = peft_merged(run_dir)
    want = model.state_dict()
    assert weights.streamed
    assert set(weights.names()) == set(want) - ({"lm_head.weight"} if tied else set())
    assert ("lm_head.weight" in weights.names()) is not tied
    assert weights.config.vocab_size == model.config.vocab_size == want["model.embed_tokens.weight"].shape[0]
    for key in weights.names():
        got = weights.get(key)
        assert got.dtype == torch.float32 and weights.shape(key) == tuple(got.shape), key
        assert torch.equal(got, want[key]), key
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights.get(q), base[q])
    spec = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert bool(spec["trainable_token_indices"]) is chatml
    if chatml:
        rows = next(iter(spec["trainable_token_indices"].values()))
        embed = "model.embed_tokens.weight"
        assert not torch.equal(weights.get(embed)[rows], base[embed][rows])


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # the LoRA run has no DoRA magnitudes: peft makes them
def test_dora_adapter_falls_back_to_the_whole_model(trained, tmp_path, caplog):
    """An adapter streaming cannot apply (DoRA) gives InMemory, the merged model loaded whole, and says why."""
    from orpo.after.runs import resolve
    from orpo.after.weights import InMemory, merged_weights

    dora = tmp_path / "dora"
    shutil.copytree(trained("chat_model_dir"), dora)
    spec_file = dora / "final" / "adapter_config.json"
    spec_file.write_text(json.dumps(json.loads(spec_file.read_text()) | {"use_dora": True}))
    with caplog.at_level(logging.WARNING, logger="orpo.after.weights"):
        weights, _ = merged_weights(resolve(str(dora)))
    assert isinstance(weights, InMemory) and not weights.streamed
    assert "loading the whole model in fp32 (the adapter sets use_dora)" in caplog.text
    assert type(weights.model).__name__ == "LlamaForCausalLM"  # merged: no peft layers left
    state = weights.model.state_dict()
    assert all(torch.equal(weights.get(k), state[k]) for k in weights.names())
