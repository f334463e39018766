"""orpo.api: the Python API behind the commands. `orpo.train` returns a Run that evaluates, merges, chats and
reports as the commands do; errors are exceptions; a notebook can rerun a cell and get the same numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import orpo
from conftest import tiny_overrides
from orpo.config import parse_overrides

NOISE = ("time", "tokens_per_second", "seconds_per_step")  # wall-clock figures


def settings(model_dir, data, out, **extra) -> dict:
    return parse_overrides(tiny_overrides(model_dir, data, out, **extra))


def numbers(run) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in NOISE} for line in run.metrics]


def test_import_orpo_is_instant_and_names_load_on_first_use():
    code = ("import sys, orpo; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "import orpo.training.loop; assert callable(orpo.train) and orpo.ORPOTrainer.__name__ == 'ORPOTrainer'; "
            "assert {'train', 'load_run', 'ORPOConfig', 'ConfigError', 'DataError', 'HubError'} <= set(dir(orpo))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_returns_a_run_that_does_what_the_commands_do(chat_model_dir, pairs_file, tmp_path):
    run = orpo.train(settings(chat_model_dir, pairs_file, tmp_path / "run"), **{"lora.r": 2, "max_steps": 2})
    assert run.path == tmp_path / "run" and run.config.lora.r == 2 and run.summary["steps"] == 2
    assert [line["step"] for line in run.metrics if "loss" in line] == [1, 2]
    again = orpo.load_run(tmp_path / "run").evaluate(generate=False)
    assert again["rewards/accuracies"] == pytest.approx(run.summary["after"]["rewards/accuracies"])
    assert again["loss"] == pytest.approx(run.summary["after"]["loss"], abs=1e-5)
    assert isinstance(run.chat("Add 2 and 3.", max_new_tokens=4), str)
    assert run.report() == tmp_path / "run" / "report.html"
    html = run._repr_html_()
    assert "preference accuracy" in html and "data:image/png;base64," in html and "<body" not in html
    merged = run.merge(tmp_path / "merged", dtype="fp32")
    assert merged.check.passed and (merged.path / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="is not a finished run"):
        orpo.load_run(tmp_path)


def test_a_rerun_gives_the_same_numbers_and_a_failed_call_leaves_nothing_behind(chat_model_dir, pairs_file, tmp_path):
    """A notebook reruns cells: the same call twice gives the same metrics, to the last digit; a bad config and a
    failure after the processes were set up (no data rows) raise their one-line errors and the next call trains
    as if they had not happened; the caller's random number generators are as they were."""
    first = orpo.train(settings(chat_model_dir, pairs_file, tmp_path / "a"))
    with pytest.raises(orpo.ConfigError, match="learning_rate"):
        orpo.train(settings(chat_model_dir, pairs_file, tmp_path / "b"), learning_rate=-1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(orpo.DataError, match="empty"):
        orpo.train(settings(chat_model_dir, empty, tmp_path / "c"), bf16=True)  # another precision, too
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    second = orpo.train(settings(chat_model_dir, pairs_file, tmp_path / "d"))
    assert torch.equal(torch.rand(3), expected)
    assert numbers(first) == numbers(second)


def test_config_sources_and_overrides(tmp_path, chat_model_dir, pairs_file):
    """A YAML path, a dict (nested or dotted keys) or a Config; keyword overrides on top, dotted ones too; a
    section given as a mapping keeps the keys it does not name."""
    from orpo.config import make_config

    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  name_or_path: {chat_model_dir}\n  chat_template: own\nlearning_rate: 1.0e-4\n")
    config = make_config(path, {"lora.r": 8, "model": {"load_in_4bit": False}})
    assert (config.model.name_or_path, config.model.chat_template, config.lora.r, config.learning_rate) == (str(chat_model_dir), "own", 8, 1e-4)
    assert make_config({"lora.r": 4, "data": {"path": str(pairs_file)}}).data.path == str(pairs_file)
    assert make_config(config, {"beta": 0.5}).beta == 0.5 and make_config().learning_rate == 1e-3  # None: the demo preset
    with pytest.raises(orpo.ConfigError, match="unknown key 'lora.rank'"):
        make_config({"lora.rank": 4})
