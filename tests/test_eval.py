"""`orpo eval`: a run's numbers equal its summary.json, its base model's equal `before`; compare; errors."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_overrides
from orpo.after.card import finish_run
from orpo.cli import main
from orpo.config import load_config
from orpo.training.loop import train


@pytest.fixture(scope="module")
def tiny_run(chat_model_dir, tmp_path_factory):
    """A finished 3-step LoRA run on the tiny chat model (24 pairs, 4 held out)."""
    from conftest import PAIRS, write_jsonl

    tmp = tmp_path_factory.mktemp("assess")
    data = write_jsonl(tmp / "pairs.jsonl", PAIRS * 4)
    out = tmp / "run"
    train(load_config(None, tiny_overrides(chat_model_dir, data, out, max_new_tokens=4)), finish=finish_run)
    return out


def test_eval_of_a_run_equals_summary_after_and_base_equals_before(tiny_run, chat_model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_run), "--compare", str(chat_model_dir), "--samples", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "preference accuracy" in text and "change" in text and "generation samples" in text
    results = json.loads(out.read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    run, base = results[str(tiny_run)], results[str(chat_model_dir)]
    for key in ("loss", "nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins"):
        assert run[key] == pytest.approx(summary["after"][key], abs=1e-5)
        assert base[key] == pytest.approx(summary["before"][key], abs=1e-5)  # LoRA B = 0 at step 0
    assert len(run["samples"]) == 2 and run["samples"][0]["prompt"] == base["samples"][0]["prompt"]
    assert "summary.json 'after' vs now" in text


def test_eval_of_a_base_model_on_a_data_file(chat_model_dir, pairs_file, capsys):
    assert main(["eval", str(chat_model_dir), "data.test_size=4", "max_length=64", "max_prompt_length=32",
                 "--data", str(pairs_file), "--no-generate"]) == 0
    text = capsys.readouterr().out
    assert "preference accuracy" in text and "generation samples" not in text


def test_eval_errors(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("max_steps: 3\n")
    assert main(["eval", str(tmp_path)]) == 1
    assert "no final/ model" in capsys.readouterr().err
    assert main(["eval", "builtin", "data.nope=1"]) == 2


def test_lm_eval_harness_on_a_local_task(tiny_run, tmp_path, capsys, monkeypatch):
    """A two-choice task defined here, on local data: runs offline through the run's adapter model."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"question": "What is the capital of France?", "choices": ["Paris", "green"], "label": 0},
            {"question": "Add 2 and 3.", "choices": ["6", "5"], "label": 1},
            {"question": "What colour is snow?", "choices": ["white", "green"], "label": 0}]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_qa.yaml").write_text(
        f"task: tiny_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_run), "--no-generate", "--lm-eval", "tiny_qa", "--lm-eval-include", str(tmp_path), "--output", str(out)]) == 0
    acc = json.loads(out.read_text())[str(tiny_run)]["lm_eval"]["tiny_qa"]["acc"]
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "tiny_qa/acc" in capsys.readouterr().out


def test_the_nous_preset_names_tasks_lm_eval_has():
    """AGIEval, GPT4All, TruthfulQA, Bigbench: every name is a task of the installed lm-evaluation-harness
    (its registry is read offline; the datasets themselves come from the Hub on first use)."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from orpo.after.harness import PRESETS, expand

    tasks, groups = expand(["nous"])
    assert list(groups) == ["AGIEval", "GPT4All", "TruthfulQA", "Bigbench"] and len(tasks) == 8 + 7 + 1 + 14
    assert set(tasks) <= set(TaskManager().all_tasks)
    assert expand(["nous", "arc_easy", "gsm8k"])[0] == [*tasks, "gsm8k"]  # presets and names mix, no repeats
    assert PRESETS["nous"]["TruthfulQA"] == ["truthfulqa_mc2"]


def test_lm_eval_preset_before_and_after_in_one_table(tiny_run, chat_model_dir, tmp_path, capsys, monkeypatch):
    """`orpo eval RUN --compare BASE --lm-eval nous` with the preset pointed at two local tasks: both models in one
    table, each group's score and the average."""
    pytest.importorskip("lm_eval")
    from orpo.after import harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"question": "What is the capital of France?", "choices": ["Paris", "green"], "label": 0},
            {"question": "Add 2 and 3.", "choices": ["6", "5"], "label": 1}]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("qa_one", "qa_two"):
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    monkeypatch.setitem(harness.PRESETS, "nous", {"First": ["qa_one"], "Second": ["qa_two"]})
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_run), "--compare", str(chat_model_dir), "--no-generate", "--lm-eval", "nous",
                 "--lm-eval-include", str(tmp_path), "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    for name in (str(chat_model_dir), str(tiny_run)):
        lm = results[name]["lm_eval"]
        assert lm["First"]["score"] == lm["qa_one"]["acc"] and lm["Second"]["score"] == lm["qa_two"]["acc"]
        assert lm["average"]["score"] == pytest.approx((lm["qa_one"]["acc"] + lm["qa_two"]["acc"]) / 2)
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("average/score"))
    assert len(line.split()) == 3  # the base's column and the run's
