"""Shared fixtures: tiny seeded models and tokenizers built offline, and small preference files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "The sky is blue. The sky is green. Grass is green and snow is white.",
    "Add 2 and 3. The answer is 5. The answer is 6. Numbers 0 1 2 3 4 5 6 7 8 9.",
    "Hello there! How are you today? I am fine, thank you.",
    "Write a haiku about the sea. Waves fold into foam, salt wind carries the gull's cry.",
    "system user assistant You are a helpful assistant.",
]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tokenizer(chat: bool):
    """A byte-level BPE tokenizer trained on CORPUS; `chat` adds ChatML tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        fast.eos_token = "<|im_end|>"
        fast.chat_template = CHATML
    return fast


def make_model_dir(path: Path, chat: bool, seed: int = 0, hidden: int = 32, tied: bool = False) -> Path:
    """Save a 2-layer Llama (hidden 32 by default; 4-bit needs multiples of 64) with its tokenizer under path;
    `tied` shares the output layer with the input embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(chat)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """Tiny model whose tokenizer has a ChatML template."""
    return make_model_dir(tmp_path_factory.mktemp("chat_model"), chat=True)


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory) -> Path:
    """Tiny chat model with hidden 64, so bitsandbytes 4-bit blocks (64) fit."""
    return make_model_dir(tmp_path_factory.mktemp("wide_model"), chat=True, hidden=64)


@pytest.fixture(scope="session")
def tied_model_dir(tmp_path_factory) -> Path:
    """Tiny chat model whose output layer is tied to the input embeddings (as SmolLM2's)."""
    return make_model_dir(tmp_path_factory.mktemp("tied_model"), chat=True, tied=True)


@pytest.fixture(scope="session")
def tied_base_model_dir(tmp_path_factory) -> Path:
    """Tiny tied model without a chat template (ChatML set-up on a tied head)."""
    return make_model_dir(tmp_path_factory.mktemp("tied_base_model"), chat=False, tied=True)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """Tiny model whose tokenizer has no chat template (a 'base' model)."""
    return make_model_dir(tmp_path_factory.mktemp("base_model"), chat=False)


PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.", "rejected": "The capital of France is green."},
    {"prompt": "Add 2 and 3.", "chosen": "The answer is 5.", "rejected": "The answer is 6."},
    {"prompt": "Hello there!", "chosen": "How are you today?", "rejected": "I am fine."},
    {"prompt": "Write a haiku about the sea.", "chosen": "Waves fold into foam.", "rejected": "The sky is blue."},
    {"prompt": "What colour is grass?", "chosen": "Grass is green.", "rejected": "Grass is white."},
    {"prompt": "What colour is snow?", "chosen": "Snow is white.", "rejected": "Snow is green."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    """Prompt/chosen/rejected strings, 24 rows."""
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)


def tiny_overrides(model_dir: Path, data_file: Path, out: Path, **extra) -> list[str]:
    """CLI-style overrides for a fast run on the tiny model."""
    items = {
        "model.name_or_path": str(model_dir),
        "data.path": str(data_file),
        "data.test_size": 4,
        "output_dir": str(out),
        "max_length": 64,
        "max_prompt_length": 32,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4,
        "logging_steps": 1,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "lora.r": 4,
        "lora.alpha": 8,
        # the demo's choices where they differ from the (TRL) package defaults: fast, evaluated before and during
        "warmup_ratio": 0.1,
        "optim": "adamw_torch",
        "gradient_checkpointing": False,
        "eval_steps": 0.5,
        "eval_on_start": True,
        "save_steps": "null",
        "save_total_limit": 2,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL_BROWSER = "install Chromium: apt-get install chromium (Debian, Ubuntu), or put one of chromium, chromium-browser, google-chrome on PATH"


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless browser to render report and compare pages in. Without one the test skips, except under CI
    (.ci/run sets ORPO_CI=1): there it fails, in one line, since a green CI must mean the pages were rendered.
    Session-scoped so that it skips or fails before a test's training fixtures run."""
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found:
        return found
    if os.environ.get("ORPO_CI") == "1":
        pytest.fail(f"no browser under CI (ORPO_CI=1): {INSTALL_BROWSER}", pytrace=False)
    pytest.skip(f"needs a browser: {INSTALL_BROWSER}")
