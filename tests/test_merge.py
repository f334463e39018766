"""`orpo merge`: merged logits equal the adapter model's (ChatML rows included), files, generation config."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PAIRS, tiny_overrides, write_jsonl
from orpo.after.card import finish_run
from orpo.cli import main
from orpo.config import load_config
from orpo.training.loop import train


@pytest.fixture(scope="module")
def chatml_run(base_model_dir, tmp_path_factory):
    """A LoRA run on a model without a chat template: ChatML tokens added, their rows trained."""
    tmp = tmp_path_factory.mktemp("merge")
    data = write_jsonl(tmp / "pairs.jsonl", PAIRS * 4)
    out = tmp / "run"
    train(load_config(None, tiny_overrides(base_model_dir, data, out, max_steps=2, learning_rate=0.05, eval_on_start="false", eval_steps="null")), finish=finish_run)
    return out


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 1e-4), ("bf16", None)])
def test_merge_matches_the_adapter_model(chatml_run, tmp_path, capsys, dtype, tolerance):
    out = tmp_path / f"merged-{dtype}"
    assert main(["merge", str(chatml_run), "--dtype", dtype, "--out", str(out), "--max-shard-size", "20KB"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "max |diff|" in text
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "orpo_config.yaml").is_file() and (out / "chat_template.jinja").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == im_end
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    check = json.loads((out / "orpo_merge.json").read_text())
    assert check["passed"] and check["adapter_effect"] > 10 * check["max_abs_diff"]
    if tolerance:
        assert check["max_abs_diff"] < tolerance


def test_merge_fails_loudly_when_the_weights_do_not_match(chatml_run, tmp_path, monkeypatch, capsys):
    """A merge that loses the adapter must give FAIL and exit status 1."""
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())
    assert main(["merge", str(chatml_run), "--dtype", "fp32", "--out", str(tmp_path / "bad")]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_merge_needs_a_run(tmp_path, capsys):
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "m")]) == 1
    assert "is not a model folder (no config.json), a run folder (config.yaml + final/)" in capsys.readouterr().err


def test_qlora_run_merges_into_a_16_bit_base(wide_model_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    run = tmp_path / "q"
    train(load_config(None, tiny_overrides(wide_model_dir, data, run, max_steps=1, eval_on_start="false", eval_steps="null", **{
        "model.load_in_4bit": "true", "model.bnb_4bit_compute_dtype": "float32"})), finish=finish_run)
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--dtype", "fp16", "--out", str(out)]) == 0
    assert "PASS" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16 and not any("4bit" in type(m).__name__ for m in model.modules())


def test_bf16_merge_rounds_each_weight_once(chatml_run, tmp_path, capsys):
    """Every merged bf16 weight is the fp32 merge rounded once to bf16 (merging in bf16 would round the fp32
    base, then the sum), and the check states its tolerance: 4 x bf16 eps = 2^-5 of the largest logit."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from orpo.model.load import load_base, load_tokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(chatml_run), "--dtype", "bf16", "--out", str(out)]) == 0
    assert "= 0.03125 x max |logit|" in capsys.readouterr().out
    config = load_config(chatml_run / "config.yaml")
    tokenizer, new_ids = load_tokenizer(config)
    base = load_base(config, tokenizer, new_ids, dtype=torch.float32, quantized=False)
    want = PeftModel.from_pretrained(base, chatml_run / "final").merge_and_unload().to(torch.bfloat16).state_dict()
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() <= want.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name
