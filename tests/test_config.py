"""Config: defaults, YAML + overrides, and every validation error path (checked before any model loads)."""

from __future__ import annotations

import pytest
import yaml

from orpo.cli import main
from orpo.config import Config, ConfigError, describe_keys, load_config, save_config


def test_defaults_are_the_demo():
    cfg = load_config()
    assert cfg.model.name_or_path == "builtin" and cfg.data.path == "builtin"
    assert cfg.beta == 0.1 and cfg.lora.enabled and cfg.lora.target_modules == "all-linear"


def test_the_fast_path_is_the_default_and_its_budget_follows_the_device():
    """layout=packed unless asked; the pass budget defaults to max_length on a CPU and to a full plain
    micro-batch (2 x batch x max_length) on a GPU; flex_attention packs one row per pass."""
    import torch

    from orpo.layout import make_layout

    cfg = load_config(None, ["max_length=512", "max_prompt_length=256", "per_device_train_batch_size=2"])
    assert cfg.layout == "packed" and cfg.max_tokens_per_batch is None and cfg.logps_chunk_size is None
    cpu = make_layout(cfg, 0, 2, torch.device("cpu"), "sdpa")
    assert (cpu.kind, cpu.max_tokens, cpu.one_row) == ("packed", 512, False)
    assert make_layout(cfg, 0, 2, torch.device("cuda"), "sdpa").max_tokens == 2048
    assert make_layout(cfg, 0, 2, torch.device("cuda"), "flex_attention").one_row
    set_budget = load_config(None, ["max_tokens_per_batch=3000", "layout=plain"])
    assert make_layout(set_budget, 0, 2, torch.device("cpu"), "sdpa").max_tokens == 3000
    assert make_layout(set_budget, 0, 2, torch.device("cpu"), "sdpa").kind == "plain"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"beta": 0.2, "lora": {"r": 8}, "report_to": "none"}))
    cfg = load_config(path, ["lora.r=4", "eval_steps=0.2", "lora.target_modules=[q_proj, v_proj]", "report_to=tensorboard"])
    assert cfg.beta == 0.2 and cfg.lora.r == 4 and cfg.eval_steps == 0.2
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.report_to == ["tensorboard"]


def test_eval_interval_int_and_fraction():
    assert load_config(None, ["eval_steps=0.2"]).eval_interval(50) == 10
    assert load_config(None, ["eval_steps=7"]).eval_interval(50) == 7
    assert load_config(None, ["eval_steps=null"]).eval_interval(50) is None


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["beta=0.3", "model.load_in_4bit=true"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["betaa=0.1"], ["unknown key 'betaa'", "beta"]),
        (["lora.rank=4"], ["unknown key 'lora.rank'", "alpha", "r,"]),
        (["learning_rate=fast"], ["learning_rate", "'fast'"]),
        (["lora.r=0"], ["lora.r", "0"]),
        (["optim=sgd"], ["optim", "'sgd'", "adamw_torch", "paged_adamw_8bit"]),
        (["lr_scheduler_type=step"], ["lr_scheduler_type", "cosine", "inverse_sqrt"]),
        (["report_to=neptune"], ["report_to", "'neptune'", "wandb"]),
        (["model.dtype=int8"], ["model.dtype", "bfloat16"]),
        (["bf16=true", "fp16=true"], ["bf16 and fp16"]),
        (["max_prompt_length=1024", "max_length=1024"], ["max_prompt_length (1024)", "max_length (1024)"]),
        (["model.load_in_4bit=true", "lora.enabled=false"], ["load_in_4bit", "lora.enabled"]),
        (["model.gguf_file=x.gguf", "model.load_in_4bit=true"], ["gguf_file", "load_in_4bit"]),
        (["max_steps=0"], ["max_steps", "0"]),
        (["eval_steps=1.5"], ["eval_steps", "1.5", "fraction"]),
        (["eval_steps=0"], ["eval_steps", "0"]),
        (["data.path=x.jsonl", "data.test_size=0"], ["no evaluation data"]),
        (["warmup_ratio=2"], ["warmup_ratio", "2"]),
        (["lora.dropout=1.0"], ["lora.dropout"]),
        (["data.truncation_mode=middle"], ["data.truncation_mode", "keep_end"]),
        (["model=3"], ["model", "3"]),
        (["layout=padded"], ["layout", "'padded'", "packed", "plain"]),
        (["max_tokens_per_batch=8"], ["max_tokens_per_batch", "8"]),
        (["logps_chunk_size=0"], ["logps_chunk_size", "0"]),
    ],
)
def test_invalid_configs(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: gpt2\n")
    with pytest.raises(ConfigError, match="unknown key 'model.name'.*name_or_path"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"), [("a: [1, 2", "not valid YAML"), ("- a\n- b\n", "must be a mapping")]
)
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["learning_rate"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["beta=1", "beta.x=1"])


def test_cli_config_error_exits_2_before_loading(capsys):
    assert main(["train", "beta=-1"]) == 2
    err = capsys.readouterr().err
    assert "beta" in err and "-1" in err


def test_orpo_config_lists_every_key(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    keys = [k for k, _, _ in describe_keys()]
    for key in keys:
        assert key in out
    for trl_name in (
        "learning_rate", "beta", "max_length", "max_prompt_length", "per_device_train_batch_size",
        "per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
        "warmup_steps", "warmup_ratio", "lr_scheduler_type", "optim", "weight_decay", "max_grad_norm",
        "logging_steps", "eval_steps", "save_steps", "save_total_limit", "seed", "output_dir",
        "gradient_checkpointing", "bf16", "fp16", "report_to",
    ):
        assert trl_name in Config.model_fields
    assert all(text for _, _, text in describe_keys())


def test_shipped_configs_and_recipes_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted(root.glob("configs/*.yaml")) + sorted(root.glob("recipes/*.yaml"))
    assert len(files) >= 3
    for path in files:
        load_config(path)
    assert load_config(root / "configs" / "demo.yaml").model_dump(exclude={"output_dir"}) == load_config().model_dump(exclude={"output_dir"})
