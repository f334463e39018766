"""`orpo plan` and `orpo.plan`: the figures as data and as text, the data's real lengths, verdicts and the changes
that fit, the pre-check `orpo train` runs on a GPU, and bad input (one line each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import orpo
from orpo.cli import main
from orpo.config import ConfigError, make_config
from orpo.training.gpus import GPUS
from orpo.training.plan import PlanError, fit_check, lay_out, plan_job, read_lengths, render

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama3_8b() -> Path:
    """Llama 3 8B's config.json alone (bench/models/llama-3-8b, the shape the README's plan uses): no weights."""
    return ROOT / "bench" / "models" / "llama-3-8b"


def recipe(model: Path, **extra):
    return make_config(ROOT / "recipes" / "llama3-8b-orpo-qlora.yaml", {"model.name_or_path": str(model), **extra})


def test_reference_recipe_plan(llama3_8b):
    """The reference job: 8B QLoRA fits every listed GPU but the T4 in orpo's layout; TRL's full logits need more."""
    plan = plan_job(recipe(llama3_8b), read_data=False)
    assert [t.name for t in plan.targets] == list(GPUS)
    assert 8.0e9 < plan.params < 8.1e9
    assert plan.trainable == 16 * 32 * (2 * 4096 + 2 * (4096 + 1024) + 2 * 4096 + 3 * (4096 + 14336))  # r x (in + out), all linear
    l4 = plan.target("L4")
    assert l4.fits and 8 < l4.peak_gib < 18 and l4.trl_peak_gib > l4.peak_gib
    assert l4.step_seconds > plan.target("H100").step_seconds > 0
    text = render(plan)
    assert "TRL ORPOTrainer peak" in text and "estimate" in text and "L4: fits" in text


def test_changes_that_fit_are_checked(llama3_8b):
    """Full fine-tuning of 8B in bf16 does not fit an L4: each suggested change is one that fits, smallest first."""
    plan = plan_job(recipe(llama3_8b, **{"model.load_in_4bit": False, "lora.enabled": False, "optim": "adamw_torch"}),
                    gpus=["L4"], read_data=False)
    target = plan.target("L4")
    assert not target.fits
    assert target.changes and all(c["peak_gib"] <= target.memory_gib for c in target.changes)
    assert "does not fit" in render(plan)


def test_engines_divide_the_model(llama3_8b):
    config = recipe(llama3_8b, **{"model.load_in_4bit": False, "lora.enabled": False})
    one = plan_job(config, gpus=["H100"], read_data=False).target("H100").orpo
    fsdp = plan_job(config, gpus=["H100"], num_gpus=8, engine="fsdp2", read_data=False).target("H100").orpo
    ddp = plan_job(config, gpus=["H100"], num_gpus=8, engine="ddp", read_data=False).target("H100").orpo
    assert fsdp.weights == one.weights // 8 and fsdp.optimizer == one.optimizer // 8
    assert ddp.weights == one.weights and ddp.optimizer == one.optimizer


def test_lengths_from_the_data(chat_model_dir, pairs_file):
    """The plan reads the tokenized pairs; the passes hold exactly the training pairs, packed as the loop packs them."""
    config = make_config({"model.name_or_path": str(chat_model_dir), "data.path": str(pairs_file), "data.test_size": 4,
                          "per_device_train_batch_size": 4, "max_length": 64, "max_prompt_length": 32})
    lengths, new_tokens = read_lengths(config)
    assert len(lengths.pairs) == 20 and "tokenized" in lengths.source and new_tokens == 0
    assert all(p + c <= 64 and p <= 32 for p, c, _ in lengths.pairs)
    steps = lay_out(config, lengths, "cpu", "orpo_split_sdpa", 1)
    assert sorted(x for s in steps for p in s for x in p.pairs) == sorted(lengths.pairs)
    assert all(p.tokens <= 64 or len(p.pairs) == 1 for s in steps for p in s)  # the CPU's budget: max_length


def test_api_and_cli_give_the_same_figures(chat_model_dir, pairs_file, capsys):
    items = [f"model.name_or_path={chat_model_dir}", f"data.path={pairs_file}", "data.test_size=4", "max_length=64", "max_prompt_length=32"]
    assert main(["plan", *items, "--gpu", "L4", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    plan = orpo.plan(dict(i.split("=", 1) for i in items), gpus=["L4", "cpu"])
    assert printed["targets"][0]["peak_gib"] == plan.as_dict()["targets"][0]["peak_gib"]
    assert printed["targets"][1]["name"] == "CPU" and printed["targets"][1]["fits"] is None
    assert main(["plan", *items, "--gpu", "T4"]) == 0
    assert "T4: fits" in capsys.readouterr().out


def test_unknown_gpu_lists_the_known_ones(chat_model_dir, capsys):
    assert main(["plan", f"model.name_or_path={chat_model_dir}", "--gpu", "V100", "--no-data"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown GPU 'V100'" in err and all(name in err for name in GPUS)


def test_unreadable_model_config(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    assert main(["plan", f"model.name_or_path={folder}", "--no-data"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"orpo: error: cannot read the model config of {folder}")
    with pytest.raises(PlanError, match="cannot read the model config"):
        orpo.plan({"model.name_or_path": str(tmp_path / "missing")}, read_data=False)


def test_invalid_config_same_message_as_train(capsys):
    bad = ["max_prompt_length=600", "max_length=512"]
    assert main(["plan", *bad]) == 2
    plan_err = capsys.readouterr().err
    assert main(["train", *bad]) == 2
    assert capsys.readouterr().err == plan_err and plan_err.count("\n") == 1


def test_fit_check_before_the_model_loads(chat_model_dir, pairs_file):
    """orpo train's pre-check on a GPU: a line that fits; a refusal naming the changes that fit; check_memory=false
    warns and goes on."""
    from orpo.data.doctor import load_checked
    from orpo.model.load import load_tokenizer

    config = make_config({"model.name_or_path": str(chat_model_dir), "data.path": str(pairs_file), "data.test_size": 4,
                          "max_length": 64, "max_prompt_length": 32, "gradient_checkpointing": False})
    tokenizer, new = load_tokenizer(config)
    train_ds = load_checked(config, tokenizer)[0]
    line = fit_check(config, train_ds, len(new), "NVIDIA L4", 20 * 2**30, 1, "ddp")
    assert line.endswith(": fits") and "GiB free on NVIDIA L4" in line
    need = float(line.split("peak ")[1].split(" GiB")[0])
    free = int((need - 0.05) * 2**30)
    with pytest.raises(ConfigError, match="does not fit") as raised:
        fit_check(config, train_ds, len(new), "NVIDIA L4", free, 1, "ddp")
    assert "check_memory=false" in str(raised.value)
    goes_on = fit_check(config.model_copy(update={"check_memory": False}), train_ds, len(new), "NVIDIA L4", free, 1, "ddp")
    assert "starting anyway" in goes_on
