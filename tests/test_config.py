"""Config: defaults, YAML + overrides, and every validation error path (checked before any model loads)."""

from __future__ import annotations

import pytest
import yaml

from orpo.cli import main
from orpo.config import Config, ConfigError, describe_keys, load_config, save_config


def test_defaults_are_trls_and_the_demo_has_its_own_preset(monkeypatch, tmp_path):
    """Every key orpo shares with TRL 1.16's ORPOConfig has TRL's default (learning_rate 1e-6, not the demo's
    1e-3); `orpo train` without a config file uses the demo preset, with a file the defaults."""
    import dataclasses

    from trl.experimental.orpo import ORPOConfig

    import orpo.training.loop

    cfg = load_config()
    assert cfg.model.name_or_path == "builtin" and cfg.data.path == "builtin"
    assert cfg.beta == 0.1 and cfg.lora.enabled and cfg.lora.target_modules == "all-linear"
    trl = {f.name: f.default for f in dataclasses.fields(ORPOConfig) if f.default is not dataclasses.MISSING}
    shared = sorted(set(trl) & set(Config.model_fields) - {"output_dir", "report_to", "bf16", "resume_from_checkpoint"})
    assert len(shared) >= 20
    assert {k: getattr(cfg, k) for k in shared} == {k: trl[k] for k in shared}
    assert cfg.learning_rate == 1e-6 and cfg.num_train_epochs == 3.0 and cfg.optim == "adamw_torch_fused"
    assert cfg.report_to == [] and cfg.bf16 is False  # TRL's bf16=None: on only where a GPU has it

    seen = []
    monkeypatch.setattr(orpo.training.loop, "train", lambda config, finish=None: seen.append(config) or {})
    assert main(["train", "max_steps=2"]) == 0
    (tmp_path / "mine.yaml").write_text("output_dir: somewhere\n")
    assert main(["train", str(tmp_path / "mine.yaml"), "max_steps=2"]) == 0
    demo, mine = seen
    assert demo.learning_rate == 1e-3 and demo.max_steps == 2 and demo.eval_on_start
    assert mine.learning_rate == 1e-6 and mine.output_dir == "somewhere"


def test_a_trl_config_ports_over(tmp_path, capsys):
    """A TRL ORPO training config: its keys with a meaning here are taken (strategies mapped), the Hub keys get
    one line each naming the command to use instead; without them it loads."""
    trl_style = {
        "output_dir": "orpo-llama3", "overwrite_output_dir": True, "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2, "gradient_accumulation_steps": 4, "learning_rate": 8e-6, "beta": 0.1,
        "lr_scheduler_type": "linear", "max_length": 1024, "max_prompt_length": 512, "max_completion_length": 512,
        "num_train_epochs": 1, "eval_strategy": "steps", "eval_steps": 0.2, "save_strategy": "no", "logging_steps": 1,
        "logging_strategy": "steps", "warmup_steps": 10, "report_to": "none", "optim": "paged_adamw_8bit",
        "gradient_checkpointing": True, "bf16": False, "seed": 42, "remove_unused_columns": False,
        "hub_model_id": "me/orpo-llama3", "push_to_hub": True, "dataloader_num_workers": 4,
    }
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(trl_style))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    for key in ("hub_model_id", "push_to_hub", "remove_unused_columns", "dataloader_num_workers"):
        assert f"  {key} (a TRL key) has no meaning in orpo: " in err
    assert "orpo push OUTPUT_DIR --repo USER/NAME" in err and "max_completion_length" not in err
    for key in ("hub_model_id", "push_to_hub", "remove_unused_columns", "dataloader_num_workers"):
        del trl_style[key]
    path.write_text(yaml.safe_dump(trl_style))
    cfg = load_config(path)
    assert (cfg.learning_rate, cfg.eval_steps, cfg.save_steps, cfg.overwrite_output_dir, cfg.optim) == (8e-6, 0.2, None, True, "paged_adamw_8bit")
    with pytest.raises(ConfigError, match="eval_strategy: 'epoch' has no equivalent here; use eval_steps"):
        load_config(path, ["eval_strategy=epoch"])
    assert load_config(path, ["eval_strategy=no", "eval_steps=null"]).eval_steps is None


def test_the_fast_path_is_the_default_and_its_budget_follows_the_device():
    """layout=packed unless asked; the pass budget defaults to max_length on a CPU and to a full plain
    micro-batch (2 x batch x max_length) on a GPU; flex_attention packs one row per pass."""
    import torch

    from orpo.training.layout import make_layout

    cfg = load_config(None, ["max_length=512", "max_prompt_length=256", "per_device_train_batch_size=2"])
    assert cfg.layout == "packed" and cfg.max_tokens_per_batch is None and cfg.logps_chunk_size is None
    cpu = make_layout(cfg, 0, 2, torch.device("cpu"), "sdpa")
    assert (cpu.kind, cpu.max_tokens, cpu.one_row) == ("packed", 512, False)
    assert make_layout(cfg, 0, 2, torch.device("cuda"), "sdpa").max_tokens == 2048
    assert make_layout(cfg, 0, 2, torch.device("cuda"), "flex_attention").one_row
    assert make_layout(cfg, 0, 2, torch.device("cpu"), "orpo_split_sdpa").one_row
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
        (["data.path=x.jsonl", "data.test_size=0", "eval_on_start=true"], ["no evaluation data"]),
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


def test_the_bad_items_of_one_list_are_one_line():
    """report_to: [0, 'x'] is one key: one line naming both items (a fuzz case: it was two lines)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["report_to=[0, x]"])
    assert str(info.value).count("\n") == 0 and "report_to.0: 0 is not allowed" in str(info.value)
    assert "report_to.1: 'x' is not allowed" in str(info.value)


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
    from orpo.config import DEMO

    assert load_config(root / "configs" / "demo.yaml") == load_config(None, preset=DEMO)


def test_a_duplicate_key_and_non_utf8_bytes_name_their_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.1\nlora:\n  r: 8\n  r: 16\n")
    with pytest.raises(ConfigError, match="c.yaml: line 4: key 'r' appears twice in the same section"):
        load_config(path)
    path.write_bytes(b"beta: 0.1\noutput_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match="c.yaml: line 2 is not UTF-8 text"):
        load_config(path)


def _fuzz_values():
    from hypothesis import strategies as st

    return st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def test_fuzz_config_files_fail_in_one_line_and_write_nothing(tmp_path_factory):
    """Config files with one random key (a real one or not) set to a random value: either a valid config, or
    `orpo train FILE` exits 2 with one line naming the file and the key, no traceback, nothing written."""
    import contextlib
    import io

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keys = [k for k, _, _ in describe_keys()]
    names = st.one_of(st.sampled_from(keys), st.from_regex(r"[a-z_]{1,10}(\.[a-z_]{1,8})?", fullmatch=True))

    @given(key=names, value=_fuzz_values())
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    def check(key, value):
        folder = tmp_path_factory.mktemp("fuzz")
        tree: dict = {}
        node = tree
        *sections, last = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = value
        path = folder / "c.yaml"
        path.write_text(yaml.safe_dump(tree))
        try:
            load_config(path)
            return  # a valid config: nothing to refuse
        except ConfigError:
            pass
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["train", str(path)])
        lines = err.getvalue().strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert str(path) in lines[0] and (last in lines[0] or sections[0] in lines[0]), lines
        assert "Traceback" not in err.getvalue() and [p.name for p in folder.iterdir()] == ["c.yaml"]

    check()
