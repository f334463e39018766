"""Command-line conventions: options anywhere, --version, one meaning for --json, exit codes in --help, and
third-party progress bars quiet before training unless -v."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_overrides
from orpo.cli import main, parse


def test_options_go_anywhere_on_the_line():
    assert parse(["train", "-v"]).verbose and parse(["-v", "train"]).verbose and not parse(["train"]).verbose
    args = parse(["eval", "RUN", "--data", "pairs.jsonl", "beta=0.2", "--no-generate", "max_length=64"])
    assert (args.target, args.data, args.items, args.no_generate) == ("RUN", "pairs.jsonl", ["beta=0.2", "max_length=64"], True)
    assert parse(["train", "my.yaml", "-v", "beta=0.2"]).items == ["my.yaml", "beta=0.2"]
    assert parse(["data", "inspect", "--json", "max_length=64"]).items == ["max_length=64"]


@pytest.mark.parametrize("argv", [["eval", "RUN", "--data", "f", "stray"], ["report", "RUN", "beta=0.2"], ["train", "--nope"]])
def test_anything_else_left_over_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_version_and_exit_codes_in_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("orpo ")
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["data", "inspect", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "exit status: 0 done, 1 failed" in text and "2 bad usage or config" in text, argv


def test_json_is_stdout_and_output_is_a_file(chat_model_dir, pairs_file, tmp_path, capsys):
    """`orpo eval --json` prints only JSON; `--output FILE` writes the same results to a file as well."""
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(chat_model_dir, pairs_file, run, max_steps=1, eval_on_start="false", eval_steps="null")]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--no-generate", "--json", "--output", str(tmp_path / "eval.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "eval.json").read_text())
    assert "rewards/accuracies" in printed[str(run)]


def test_third_party_bars_are_quiet_unless_verbose(chat_model_dir, pairs_file, tmp_path, capsys):
    """Loading weights and writing the tokenized cache print no bars of their own; orpo's training bar stays."""
    common = dict(max_steps=1, eval_on_start="false", eval_steps="null")
    assert main(["train", *tiny_overrides(chat_model_dir, pairs_file, tmp_path / "a", **common), "data.cache_dir=" + str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert "train:" in err or "train: 100%" in err
    assert "Loading weights" not in err and "Saving the dataset" not in err
    assert main(["train", "-v", *tiny_overrides(chat_model_dir, pairs_file, tmp_path / "b", **common), "data.cache_dir=" + str(tmp_path / "cache2")]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" in err and "Saving the dataset" in err
