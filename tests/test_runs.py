"""What eval/chat/merge point at: a folder's own config cannot make orpo run the model's code."""

from __future__ import annotations

import json
import shutil

import pytest

from orpo.after.runs import MERGED_CONFIG
from orpo.cli import main
from orpo.config import load_config, save_config

CONFIG_CODE = """import pathlib
from transformers import LlamaConfig

pathlib.Path({marker!r}).touch()  # what a malicious model folder could do instead


class EvilConfig(LlamaConfig):
    model_type = "evil"
"""
MODEL_CODE = """from transformers import LlamaForCausalLM

from .configuration_evil import EvilConfig


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def remote_code_folder(chat_model_dir, tmp_path):
    """A merged-model folder whose model needs its own code, and whose orpo_config.yaml asks to trust it."""
    folder, marker = tmp_path / "sent-to-you", tmp_path / "code-ran"
    shutil.copytree(chat_model_dir, folder)
    (folder / "configuration_evil.py").write_text(CONFIG_CODE.format(marker=str(marker)))
    (folder / "modeling_evil.py").write_text(MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                               "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    save_config(load_config(None, [f"model.name_or_path={folder}", "model.trust_remote_code=true"]), folder / MERGED_CONFIG)
    return folder, marker


@pytest.mark.parametrize("command", [["chat", "--prompt", "Hello", "--max-new-tokens", "2"], ["eval", "--no-generate"]])
def test_a_folders_config_cannot_turn_on_remote_code(remote_code_folder, capsys, command):
    folder, marker = remote_code_folder
    code = main([command[0], str(folder), *command[1:]])
    err = capsys.readouterr().err
    assert code == 1 and not marker.exists()
    last = err.strip().splitlines()[-1]
    assert last == f"orpo: error: {folder}: this model needs its own Python code to load; if you trust it, add --trust-remote-code"
    assert "Traceback" not in err


def test_the_users_flag_allows_it(remote_code_folder, capsys):
    folder, marker = remote_code_folder
    assert main(["chat", str(folder), "--prompt", "Hello", "--max-new-tokens", "2", "--trust-remote-code"]) == 0
    assert marker.exists()


@pytest.fixture(scope="module")
def finished_run(chat_model_dir, tmp_path_factory):
    from conftest import PAIRS, tiny_overrides, write_jsonl
    from orpo.after.card import finish_run
    from orpo.training.loop import train

    tmp = tmp_path_factory.mktemp("finished")
    data = write_jsonl(tmp / "pairs.jsonl", PAIRS * 4)
    out = tmp / "run"
    train(load_config(None, tiny_overrides(chat_model_dir, data, out, max_steps=2, eval_steps="null", eval_on_start=False)), finish=finish_run)
    return out


@pytest.mark.parametrize("command", ["eval", "chat"])
def test_wrong_targets_get_one_line(finished_run, tmp_path, capsys, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "/no/such/dir": "/no/such/dir: no such folder",
        str(finished_run / "config.yaml"): f"{finished_run / 'config.yaml'} is a file: give a run folder, a merged or other model folder, 'builtin' or a Hub id (the run folder is {finished_run})",
        str(empty): f"{empty} is not a model folder (no config.json), a run folder (config.yaml + final/) or a merged model",
    }
    for target, message in cases.items():
        args = [command, target] + (["--prompt", "hi"] if command == "chat" else ["--no-generate"])
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"orpo: error: {message}"]


def test_eval_on_other_data_is_not_compared_with_the_runs_summary(finished_run, tmp_path, capsys):
    from conftest import PAIRS, write_jsonl

    assert main(["eval", str(finished_run), "--no-generate"]) == 0
    assert "summary.json 'after' vs now: max |difference|" in capsys.readouterr().out
    other = write_jsonl(tmp_path / "other.jsonl", PAIRS[::-1] * 3)
    assert main(["eval", str(finished_run), "data.test_size=6", "--no-generate", "--data", str(other)]) == 0
    out = capsys.readouterr().out
    assert "(not compared with summary.json" in out and "vs now" not in out


def test_a_missing_model_folder_stops_training_in_one_line(pairs_file, tmp_path, capsys):
    from conftest import tiny_overrides

    assert main(["train", *tiny_overrides(tmp_path / "no-model", pairs_file, tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"orpo: error: model.name_or_path={tmp_path / 'no-model'}: no such folder"]


# Every command that takes a run gets the same line and exit 1 for a run that has no final/ (it stopped, or
# crashed, before saving one): a file error, as a missing folder is, not a usage error (exit 2): the same command
# line works once the run has finished. compare needs only config.yaml and metrics.jsonl, so it compares such a run.
UNFINISHED = {
    "eval": ["--no-generate"], "chat": ["--prompt", "hi"], "merge": ["--out", "{tmp}/merged"],
    "export": ["--gguf", "{tmp}/m.gguf"], "serve": ["--engine", "llama-cpp", "--print"], "push": ["--repo", "me/x", "--dry-run", "{tmp}/dry"],
}


@pytest.mark.parametrize("command", list(UNFINISHED))
def test_a_run_without_final_is_one_line_exit_1(command, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None), run / "config.yaml")
    argv = [command, str(run), *(a.format(tmp=tmp_path) for a in UNFINISHED[command])]
    assert main(argv) == 1
    said = f"{run} is neither a run folder (config.yaml + final/) nor a merged model (from `orpo merge`)" if command == "push" else (
        f"{run} has a config.yaml but no final/ model: did the run finish?")
    assert capsys.readouterr().err.strip().splitlines() == [f"orpo: error: {said}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing made


def test_an_empty_final_is_one_line_exit_1(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_config(load_config(None), run / "config.yaml")
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"orpo: error: {run}: final/ holds neither an adapter nor a model"]


def test_compare_takes_a_run_without_final(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None), run / "config.yaml")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.5}) + "\n")
    assert main(["compare", str(run), "--out", str(tmp_path / "compare.html")]) == 0
    assert (tmp_path / "compare.html").is_file()
