"""The engines' settings: every Accelerate config file under configs/accelerate is one `accelerate launch` accepts and
turns into the engine it names (DeepSpeed's checked on CPU: it needs CUDA to run), orpo fills DeepSpeed's
batch, accumulation and clipping, refuses what an engine cannot serve, and counts the passes each process runs."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orpo.config import ConfigError, load_config
from orpo.training.engine import configure_engine, fusable, passes, plain, sharded

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {"ddp": "MULTI_GPU", "fsdp2-lora": "FSDP", "fsdp2-qlora": "FSDP", "fsdp2-full": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}


def launch_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/accelerate/NAME.yaml --num_processes 2` gives each
    process, built by accelerate's own launcher code (unknown keys in the file are errors there)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "--num_processes", "2", "-m", "orpo.cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    options = {a.dest for a in parser._actions}
    section = defaults.deepspeed_config or defaults.fsdp_config
    assert not set(section) - options, f"{name}: keys accelerate launch does not know: {sorted(set(section) - options)}"
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def fake_accelerator(kind: str, plugin=None, processes: int = 2):
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType[kind], num_processes=processes, device=torch.device("cpu"),
                           state=SimpleNamespace(deepspeed_plugin=plugin),
                           gather=lambda t: torch.cat([t, t + 3]))  # the other process has 3 passes more


def test_every_accelerate_config_is_the_engine_it_names(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, kind in EXPECTED.items():
        env = launch_env(name)
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            if kind == "FSDP":
                assert env["ACCELERATE_USE_FSDP"] == "true" and FullyShardedDataParallelPlugin().fsdp_version == 2
            elif kind == "DEEPSPEED":
                plugin = DeepSpeedPlugin()
                assert plugin.zero_stage == int(name[-1])
                config = load_config(None, ["max_grad_norm=0.5", "per_device_train_batch_size=3"] + (["layout=plain"] if name == "zero3" else []))
                configure_engine(config, fake_accelerator(kind, plugin))
                ds = plugin.deepspeed_config
                assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (3, 6, 1)
                assert ds["gradient_clipping"] == 0.5
                assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (name == "zero3")  # final/ gathers
            else:
                assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env
        assert os.environ.get("ACCELERATE_USE_DEEPSPEED") is None


def test_what_an_engine_cannot_serve_is_refused(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    for key, value in launch_env("zero3").items():
        monkeypatch.setenv(key, value)
    zero3 = fake_accelerator("DEEPSPEED", DeepSpeedPlugin())
    assert sharded(zero3) and not fusable(zero3)
    with pytest.raises(ConfigError, match="layout=packed.*ZeRO-3.*layout=plain"):
        configure_engine(load_config(None, []), zero3)
    with pytest.raises(ConfigError, match="QLoRA.*ZeRO-3"):
        configure_engine(load_config(None, ["layout=plain", "model.load_in_4bit=true"]), zero3)
    with pytest.raises(ConfigError, match="on_nonfinite=skip"):
        configure_engine(load_config(None, ["layout=plain", "on_nonfinite=skip"]), zero3)
    fsdp = fake_accelerator("FSDP")
    assert sharded(fsdp) and fusable(fsdp)
    with pytest.raises(ConfigError, match="bnb_4bit_quant_storage=bfloat16"):
        configure_engine(load_config(None, ["model.load_in_4bit=true"]), fsdp)
    configure_engine(load_config(None, ["model.load_in_4bit=true", "model.bnb_4bit_quant_storage=bfloat16"]), fsdp)
    configure_engine(load_config(None, ["model.load_in_4bit=true", "on_nonfinite=skip"]), fake_accelerator("MULTI_CPU"))


def test_passes_each_process_runs():
    """One process: its own. DDP: at least one (the all-reduce needs every process). Sharded weights: as many as
    the busiest process (every pass gathers weights from all of them)."""
    assert passes(0, fake_accelerator("NO", processes=1)) == 0
    assert passes(0, fake_accelerator("MULTI_CPU")) == 1 and passes(2, fake_accelerator("MULTI_CPU")) == 2
    assert passes(2, fake_accelerator("FSDP")) == 5 and passes(0, fake_accelerator("FSDP")) == 3


def test_gradient_norms_from_every_engine_are_plain_tensors():
    assert plain(None).item() == 0.0 and plain(2.5).item() == 2.5
    norm = torch.tensor(1.5)
    assert plain(norm) is norm
