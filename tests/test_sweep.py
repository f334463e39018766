"""orpo sweep (search/): the space, the study, trials as run folders, pruning, several processes on one study,
resuming a killed sweep, the table, best.yaml and the test split; and the length-balanced accuracy it can choose on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, write_jsonl
from orpo.cli import main
from orpo.config import ConfigError, load_config
from orpo.search.space import check_space, parse_space
from orpo.search.sweep import parse_duration
from orpo.training.heldout import length_balanced, length_stats
from orpo.training.loss import add_stats

ROOT = Path(__file__).resolve().parents[1]


def sweep_items(model_dir: Path, data: Path | str, searched: tuple[str, ...] = (), **extra) -> list[str]:
    """Fixed settings of a tiny sweep: no output_dir (the sweep sets one per trial) and no searched key."""
    items = tiny_overrides(model_dir, Path(data), Path("unused"), **{"max_steps": 4, "eval_steps": 2, "eval_on_start": "false", **extra})
    return [i for i in items if i.split("=")[0] not in ("output_dir", *searched)]


def trials_json(out: Path) -> dict:
    return json.loads((out / "trials.json").read_text())


# ---------------------------------------------------------------- length-balanced accuracy


def crafted(lengths: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, response mask) of pairs laid out [chosen; rejected] whose responses have the given token lengths,
    scored by a model that prefers the shorter response: every token of a response of n tokens has log-prob -n/10."""
    width = max(max(p) for p in lengths) + 1
    rows = [c for c, _ in lengths] + [r for _, r in lengths]
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    logps = torch.zeros(len(rows), width)
    for i, n in enumerate(rows):
        mask[i, 1 : n + 1] = True
        logps[i, 1 : n + 1] = -n / 10
    return logps, mask


def balanced(batches: list[list[tuple[int, int]]]) -> dict:
    total = None
    for lengths in batches:
        total = add_stats(total, length_stats(*crafted(lengths)))
    pairs = sum(len(b) for b in batches)
    return length_balanced({k: float(v) for k, v in total.items()}, pairs)


def test_length_balanced_accuracy_of_a_scorer_that_prefers_the_shorter_response():
    """Chosen always shorter: the plain accuracy is 100% and the length-balanced one undefined (no pair where chosen
    is longer). 8 pairs with chosen shorter, 2 with chosen longer, 1 tie: plain accuracy 8/11, but the
    length-balanced accuracy is (100% + 0%) / 2 = 50%, with the counts and standard errors of both groups."""
    always = balanced([[(3, 5), (2, 9)], [(4, 6)]])
    assert always["accuracy_chosen_shorter"] == 1.0 and always["accuracy_chosen_shorter_n"] == 3
    assert always["accuracy_chosen_longer"] is None and always["length_balanced_accuracy"] is None
    mixed = balanced([[(3, 5)] * 4, [(2, 9)] * 4 + [(7, 4), (9, 2), (5, 5)]])
    assert mixed["accuracy_chosen_shorter"] == 1.0 and mixed["accuracy_chosen_shorter_n"] == 8
    assert mixed["accuracy_chosen_longer"] == 0.0 and mixed["accuracy_chosen_longer_n"] == 2
    assert mixed["pairs_same_length"] == 1
    assert mixed["length_balanced_accuracy"] == 0.5
    assert mixed["length_balanced_accuracy_se"] == 0.0  # both groups certain: the binomial SE is 0 at 0 and 1
    shuffled = balanced([[(3, 5), (7, 4), (5, 5)], [(3, 5)] * 3 + [(9, 2)] + [(2, 9)] * 4])
    assert shuffled == mixed  # sums: the batching does not matter


def test_the_held_out_metrics_carry_the_length_balanced_accuracy(chat_model_dir, tmp_path):
    """A run's summary has both groups' accuracies, counts and standard errors; the groups and the ties make up
    every held-out pair, and the eval table shows the new rows with their counts."""
    from orpo.after.eval import table

    rows = [{"prompt": "Add 2 and 3.", "chosen": "The answer is 5.", "rejected": "The answer is 6, or 7, or 9."},
            {"prompt": "Hello there!", "chosen": "How are you today? I am fine, thank you.", "rejected": "Hello."}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows * 12)
    assert main(["train", *tiny_overrides(chat_model_dir, data, tmp_path / "run", **{"data.test_size": 8})]) == 0
    after = json.loads((tmp_path / "run" / "summary.json").read_text())["after"]
    n = after["accuracy_chosen_longer_n"] + after["accuracy_chosen_shorter_n"] + after["pairs_same_length"]
    assert n == after["pairs"] == 8
    assert after["accuracy_chosen_longer_n"] > 0 and after["accuracy_chosen_shorter_n"] > 0
    mean = (after["accuracy_chosen_longer"] + after["accuracy_chosen_shorter"]) / 2
    assert after["length_balanced_accuracy"] == pytest.approx(mean)
    text = table(["after"], [after])
    assert "length-balanced accuracy" in text and "chosen shorter" in text and f"(n={after['accuracy_chosen_shorter_n']})" in text


# ---------------------------------------------------------------- the space and bad input


def test_the_space_reads_lists_ranges_and_yaml(tmp_path):
    (tmp_path / "space.yaml").write_text("beta: [0.1, 0.5]\nlearning_rate: log(1e-5,1e-3)\n")
    space = parse_space([str(tmp_path / "space.yaml"), "num_train_epochs=int(1,3)", "lora.dropout=uniform(0,0.1)"])
    assert [d.kind for d in space.values()] == ["choice", "log", "int", "uniform"]
    assert space["learning_rate"].describe() == "log(1e-05,0.001)" and space["beta"].values == (0.1, 0.5)
    assert parse_duration("1h30m") == 5400 and parse_duration("45s") == 45 and parse_duration("90") == 90
    with pytest.raises(ConfigError, match="duration"):
        parse_duration("soon")


@pytest.mark.parametrize("search, fixed, message", [
    (["bta=[0.1,0.5]"], {}, "search space bta=0.1: invalid config: unknown key 'bta'"),
    (["learning_rate=log(1e-3,1e-5)"], {}, "the range log(1e-3,1e-5) is empty"),
    (["beta=[]"], {}, "the list is empty"),
    (["lora.r=[8,0]"], {}, "search space lora.r=0: invalid config: lora.r: 0 is invalid"),
    (["beta=[0.1,0.5]"], {"beta": 0.2}, "beta is both searched ([0.1, 0.5]) and fixed on the line (beta=0.2): drop one"),
    (["output_dir=[a,b]"], {}, "set by the sweep itself"),
    (["beta=0.1"], {}, "not a list [a,b,...] or a range"),
])
def test_a_bad_space_is_one_line(search, fixed, message):
    with pytest.raises(ConfigError) as caught:
        check_space(parse_space(search), load_config(), fixed)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("extra, message", [
    (["--search", "bta=[0.1,0.5]"], "unknown key 'bta'"),
    (["--search", "learning_rate=log(1e-3,1e-5)"], "is empty"),
    (["beta=0.2", "--search", "beta=[0.1,0.5]"], "beta is both searched"),
    (["--search", "beta=[0.1,0.5]", "--storage", "sqlite:////no/such/folder/study.db"], "storage sqlite:////no/such/folder/study.db: cannot open it"),
    (["--search", "beta=[0.1,0.5]", "--storage", "/no/such/folder/study.journal"], "cannot open it (FileNotFoundError: no folder /no/such/folder)"),
    (["--search", "beta=[0.1,0.5]", "--objective", "task_accuracy"], "objective task_accuracy needs a set whose answers can be checked"),
    (["--search", "beta=[0.1,0.5]", "--validation-size", "0", "data.test_size=0"], "no evaluation data"),
    (["--search", "lora.dropout=uniform(0,0.1)"], "give --trials N"),
    (["--search", "beta=[0.1,0.5]", "--trials", "0"], "--trials must be at least 1"),
    (["--search", "beta=[0.1,0.5]", "--time", "soon"], "time 'soon': give a duration"),
])
def test_bad_sweep_input_is_one_line_and_exit_2(chat_model_dir, pairs_file, tmp_path, capsys, extra, message):
    fixed = sweep_items(chat_model_dir, pairs_file)
    assert main(["sweep", *fixed, "--out", str(tmp_path / "sweep"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not list((tmp_path / "sweep").glob("trial-*"))


def test_a_study_started_by_another_sweep_is_refused(chat_model_dir, pairs_file, tmp_path, capsys, monkeypatch):
    """The folder's study was started with another space: joining it is one line naming what differs, and nothing
    trains. Under a distributed launch the sweep says to start one process per GPU instead."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    out = tmp_path / "sweep"
    out.mkdir()
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    other = optuna.create_study(study_name="orpo-sweep", storage=storage, direction="maximize")
    other.set_user_attr("orpo_sweep", {"space": {"beta": "[0.3]"}, "objective": "accuracy", "trials": 1, "config": {}})
    fixed = sweep_items(chat_model_dir, pairs_file)
    assert main(["sweep", *fixed, "--search", "beta=[0.1,0.5]", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "study 'orpo-sweep' in " in err and "was started by another sweep (its config, space, trials differ)" in err
    assert len(err.splitlines()) == 1 and not list(out.glob("trial-*"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sweep", *fixed, "--search", "beta=[0.1,0.5]", "--out", str(tmp_path / "other")]) == 2
    assert "start one sweep per GPU (CUDA_VISIBLE_DEVICES=i)" in capsys.readouterr().err


# ---------------------------------------------------------------- sweeps


def test_a_grid_sweep_on_the_builtin_set_and_its_best_config(chat_model_dir, tmp_path, capsys, caplog):
    """3 trials on the builtin set: the table lists each, best.yaml and compare.html are written, the best trial is
    measured once on the builtin's own held-out set (test.json), and `orpo train best.yaml` reproduces the best
    trial's validation figure (seeded)."""
    out = tmp_path / "sweep"
    fixed = [f"model.name_or_path={chat_model_dir}", "data.builtin_train_size=40", "data.builtin_eval_size=6", "max_steps=4",
             "eval_steps=2", "eval_on_start=false", "max_length=64", "max_prompt_length=40", "per_device_train_batch_size=4",
             "max_new_tokens=4", "lora.r=4", "lora.alpha=8", "logging_steps=1", "learning_rate=1e-2"]
    assert main(["sweep", *fixed, "--search", "beta=[0.05,0.1,0.5]", "--validation-size", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = trials_json(out)
    assert [r["trial"] for r in result["trials"]] == [0, 1, 2]
    assert sorted(r["settings"]["beta"] for r in result["trials"]) == [0.05, 0.1, 0.5]
    assert all(r["state"] == "complete" and r["steps"] == 4 for r in result["trials"])
    assert "| trial | state | settings | preference accuracy ± SE |" in printed and "best.yaml" in printed
    assert (out / "compare.html").is_file() and (out / "trials.md").read_text() in printed + "\n"
    for r in result["trials"]:
        summary = json.loads((Path(r["folder"]) / "summary.json").read_text())
        assert summary["data"]["eval_pairs"] == 8 and summary["after"]["rewards/accuracies"] == r["value"]
    test = json.loads((out / "test.json").read_text())
    assert test["trial"] == result["best"]["trial"] and test["after"]["pairs"] == 6 and "task_accuracy" in test["after"]
    assert "Test split (6 pairs, never part of a choice)" in printed

    best = load_config(out / "best.yaml")
    assert best.beta == result["best"]["settings"]["beta"] and best.data.validation_size == 8
    assert main(["train", str(out / "best.yaml")]) == 0
    again = json.loads((out / "best" / "summary.json").read_text())["after"]
    trial = json.loads((Path(result["best"]["folder"]) / "summary.json").read_text())["after"]
    assert again["rewards/accuracies"] == result["best"]["value"]
    assert again["loss"] == pytest.approx(trial["loss"], rel=1e-6)

    caplog.clear()
    assert main(["sweep", *fixed, "--search", "beta=[0.05,0.1,0.5]", "--validation-size", "8", "--out", str(out)]) == 0
    assert "has no trial left to start (3 asked): nothing to run" in caplog.text
    assert len(trials_json(out)["trials"]) == 3 and json.loads((out / "test.json").read_text()) == test


def test_a_learning_rate_that_cannot_learn_is_pruned_at_its_first_evaluation(chat_model_dir, pairs_file, tmp_path):
    """lr 1e-2 trains first (the grid's order) and finishes; lr 1e-12 leaves the model as it was, so
    its eval loss at its first evaluation (step 2) is above the finished trial's, and the median pruner stops it
    there; the table says where and against what."""
    out = tmp_path / "sweep"
    fixed = sweep_items(chat_model_dir, pairs_file, ("learning_rate",), max_steps=6)
    assert main(["sweep", *fixed, "--search", "learning_rate=[1e-2,1e-12]", "--objective", "loss", "--prune-after", "1",
                 "--validation-size", "4", "--out", str(out)]) == 0
    first, second = trials_json(out)["trials"]
    assert first["settings"]["learning_rate"] == 1e-2 and first["state"] == "complete"
    assert second["state"] == "pruned" and second["steps"] == 2
    assert isinstance(second["accuracy"], float)  # the table shows the pruned trial's last evaluation
    assert second["note"].startswith("pruned at step 2 (evaluation 1): eval loss ") and "above the median" in second["note"]
    assert "of 1 finished trial(s) at their evaluation 1" in second["note"]
    assert not (Path(second["folder"]) / "final").exists()
    assert "| pruned |" in (out / "trials.md").read_text()


def sweep_process(out: Path, fixed: list[str], search: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "orpo.cli", "sweep", *fixed, "--search", *search, "--validation-size", "4",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_two_processes_on_one_study_run_disjoint_trials(chat_model_dir, pairs_file, tmp_path):
    """Two `orpo sweep` processes on one sweep folder (its journal file) share the 4-point grid: every point runs
    once, each trial by one process, and the table lists each trial once."""
    out = tmp_path / "sweep"
    fixed = sweep_items(chat_model_dir, pairs_file, ("learning_rate",), max_steps=12)
    search = ["learning_rate=[1e-3,2e-3,3e-3,4e-3]"]
    procs = [sweep_process(out, fixed, search) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    rows = trials_json(out)["trials"]
    assert sorted(r["trial"] for r in rows) == list(range(len(rows)))
    done = [r for r in rows if r["state"] == "complete"]
    assert sorted(r["settings"]["learning_rate"] for r in done) == [1e-3, 2e-3, 3e-3, 4e-3], rows
    assert len(rows) == 4, rows  # no point ran twice
    assert len({json.loads((Path(r["folder"]) / "summary.json").read_text())["wall_seconds"] for r in done}) == 4
    pids = {p.pid for p in procs}
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="orpo-sweep", storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
    owners = {t.user_attrs["pid"] for t in study.trials}
    assert owners <= pids and len(owners) == 2, f"trials by {owners}, processes {pids}"
    table = (out / "trials.md").read_text()
    assert all(table.count(f"\n| {n} |") == 1 for n in range(4))


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_resumes(chat_model_dir, pairs_file, tmp_path, capsys):
    """SIGKILL while trial 1 trains; the next `orpo sweep` on the folder marks trial 1 failed (its process is gone),
    reruns its settings as a new trial that says so, runs the rest of the grid, and never reruns trial 0."""
    out = tmp_path / "sweep"
    fixed = sweep_items(chat_model_dir, pairs_file, ("learning_rate",), max_steps=200, eval_steps=100)
    search = ["learning_rate=[1e-3,2e-3,3e-3]"]
    proc = sweep_process(out, fixed, search)
    deadline = time.monotonic() + 300
    while not (out / "trial-001" / "metrics.jsonl").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = (out / "trial-000" / "summary.json").stat().st_mtime_ns
    fixed = sweep_items(chat_model_dir, pairs_file, ("learning_rate",), max_steps=200, eval_steps=100)
    assert main(["sweep", *fixed, "--search", *search, "--validation-size", "4", "--out", str(out)]) == 0
    rows = {r["trial"]: r for r in trials_json(out)["trials"]}
    assert (out / "trial-000" / "summary.json").stat().st_mtime_ns == first  # not rerun
    assert rows[1]["state"] == "fail" and "its process" in rows[1]["note"] and "is gone" in rows[1]["note"]
    rerun = [r for r in rows.values() if r["note"].startswith("rerun of trial 1")]
    assert len(rerun) == 1 and rerun[0]["state"] == "complete"
    assert rerun[0]["settings"] == rows[1]["settings"]
    done = sorted(r["settings"]["learning_rate"] for r in rows.values() if r["state"] == "complete")
    assert done == [1e-3, 2e-3, 3e-3] and len(rows) == 4
    table = (out / "trials.md").read_text()
    assert "| 1 | fail |" in table and "rerun of trial 1" in table


# ---------------------------------------------------------------- dead trials


def test_a_running_trial_is_dead_when_its_process_is_gone_or_its_heartbeat_is_stale(monkeypatch):
    """Same host: judged by the process id (and its start time); another host: by the heartbeat's age. A dead trial
    is marked failed with the reason and its settings queued again; live ones are left alone."""
    import socket

    import optuna

    from orpo.search import study as studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    here = socket.gethostname()
    cases = {"gone": {"host": here, "pid": 2**22 + 12345, "pid_start": "1", "heartbeat": time.time()},
             "me": {"host": here, "pid": os.getpid(), "pid_start": studies.process_start(os.getpid()), "heartbeat": time.time()},
             "quiet": {"host": "elsewhere", "pid": 7, "heartbeat": time.time() - 3600},
             "talking": {"host": "elsewhere", "pid": 8, "heartbeat": time.time() - 30}}
    for i, (name, attrs) in enumerate(cases.items()):
        trial = study.ask()
        trial.suggest_float("beta", 0.0, 1.0)
        for key, value in {**attrs, "case": name, "index": i}.items():
            trial.set_user_attr(key, value)
    lines = studies.reap(study, stale_after=600)
    states = {t.user_attrs["case"]: t.state.name for t in study.trials if "case" in t.user_attrs}
    assert states == {"gone": "FAIL", "me": "RUNNING", "quiet": "FAIL", "talking": "RUNNING"}
    notes = {t.user_attrs["case"]: t.user_attrs.get("note", "") for t in study.trials if "case" in t.user_attrs}
    assert f"its process {2**22 + 12345} on {here} is gone" in notes["gone"]
    assert "no heartbeat from elsewhere (process 7) for 60 min" in notes["quiet"]
    queued = [t for t in study.trials if t.state.name == "WAITING"]
    assert sorted(t.user_attrs["rerun_of"] for t in queued) == [0, 2] and len(lines) == 2
    assert studies.reap(study, stale_after=600) == []  # once


def test_the_heartbeat_runs_while_the_trial_does(monkeypatch):
    import optuna

    from orpo.search import study as studies

    monkeypatch.setattr(studies, "HEARTBEAT_S", 0.05)
    trial = optuna.create_study().ask()
    trial.set_user_attr("heartbeat", 0.0)
    with studies.Heartbeat(trial):
        time.sleep(0.3)
    beat = trial.study.trials[0].user_attrs["heartbeat"]
    assert time.time() - beat < 1.0
    time.sleep(0.2)
    assert trial.study.trials[0].user_attrs["heartbeat"] == beat  # stopped with the trial
