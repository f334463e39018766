"""`orpo sweep`: choose settings on validation data, one ordinary run per trial of an Optuna study.

    trials = run_sweep(config, parse_space(["beta=[0.1,0.5]", "learning_rate=log(1e-4,1e-3)"]), out="sweep", trials=8)

What happens, top to bottom:
1. The base config gets a validation split (`data.validation_size`, taken from the training rows after the test
   split, which stays out of every choice), the sweep folder as output_dir, and evaluations during training when
   it has none (eval_steps 0.25: three before the end, for the pruner).
2. The study (study.py) is opened or created in its storage, its definition checked, dead trials reaped.
3. Optuna runs trials (TPE, or its grid sampler when every key is a list) until `trials` have finished (complete or
   pruned) in the study, whoever ran them, or `timeout` passes. Each trial is an ordinary run folder
   (OUT/trial-NNN: `orpo report`, `orpo compare`, `orpo eval` work on it), trained by the training loop in this
   process; every evaluation during training is reported to Optuna's median pruner, which stops a trial whose
   objective is worse than the median of the finished trials at the same evaluation.
4. Then: the table of trials (trials.md, trials.json), the best trial's config as best.yaml (`orpo train` takes it
   as it is and reproduces the trial), compare.html over the finished trials, and, when a test split was set
   aside, the best trial and its base model measured once on it (test.json; not again for the same best trial).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import MEMORY, Config, ConfigError, make_config, save_config
from ..training.heldout import format_metric
from . import study as studies
from .space import Dim, check_space, grid_size, is_grid

log = logging.getLogger(__name__)

# objective name: (held-out metric key, direction, label)
OBJECTIVES = {
    "accuracy": ("rewards/accuracies", "maximize", "preference accuracy"),
    "balanced_accuracy": ("length_balanced_accuracy", "maximize", "length-balanced accuracy"),
    "loss": ("loss", "minimize", "eval loss"),
    "task_accuracy": ("task_accuracy", "maximize", "task accuracy"),
}
DEFAULT_EVAL_STEPS = 0.25  # a trial's evaluations when its config has none: three during training, one at the end


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from '2h', '90m', '1h30m', '45s' or a number of seconds; None stays None."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    import re

    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or parts is None or not any(parts.groups()):
        raise ConfigError(f"time {text!r}: give a duration such as 2h, 90m, 1h30m or 3600 (seconds)")
    h, m, sec = (float(g or 0) for g in parts.groups())
    return 3600 * h + 60 * m + sec


class Unscorable(ValueError):
    """A finished trial whose objective is undefined (e.g. length-balanced accuracy with one group empty)."""


@dataclass
class SweepResult:
    """What `orpo sweep` leaves: the sweep folder, a row per trial, the best trial and its config, the test split's
    measurement (None without a test split) and the table as text."""

    folder: Path
    trials: list[dict]
    best: dict | None
    test: dict | None
    table: str
    files: dict[str, str] = field(default_factory=dict)


def base_config(config: Config, out: Path, validation_size: float) -> Config:
    """The config every trial starts from: the sweep folder as output_dir, the validation split, evaluations."""
    updates: dict[str, Any] = {"output_dir": str(out), "overwrite_output_dir": True, "data.validation_size": validation_size}
    if config.eval_steps is None:
        updates["eval_steps"] = DEFAULT_EVAL_STEPS
        log.info("eval_steps is not set: each trial evaluates every %g of its steps, for the pruner", DEFAULT_EVAL_STEPS)
    return make_config(config, updates)


def check_objective(base: Config, objective: str) -> None:
    """Raise ConfigError when the objective is unknown or needs data the config lacks."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    data = base.data
    if not (data.validation_size or data.eval_path or data.builtin or (data.test_size and data.path != MEMORY)):
        raise ConfigError(f"objective {objective}: no data to score trials on: set --validation-size > 0, data.eval_path or data.test_size")
    if objective == "task_accuracy" and not data.builtin:
        raise ConfigError("objective task_accuracy needs a set whose answers can be checked (the builtin set); "
                          f"this config trains on {data.path if not data.mixture else 'a mixture'}: choose accuracy, balanced_accuracy or loss")


def has_test(base: Config) -> bool:
    """A test split set aside from every choice: the held-out split (test_size, eval_path, the builtin's own) while
    trials are scored on a validation split."""
    data = base.data
    return bool(data.validation_size) and bool(data.eval_path or data.builtin or (data.test_size and data.path != MEMORY))


def make_sampler(space: dict[str, Dim], seed: int, trials_before: int):
    """TPE, seeded per process and by the trials already in the study, so that a resumed or second worker does
    not draw the same first settings again; for a grid, Optuna's grid sampler (the grid itself is in the queue)."""
    import optuna

    if is_grid(space):
        return optuna.samplers.GridSampler({k: list(d.values) for k, d in space.items()}, seed=seed)
    return optuna.samplers.TPESampler(seed=(seed + 7919 * trials_before + os.getpid()) % 2**32, n_startup_trials=5)


def grid_points(space: dict[str, Dim]) -> list[dict[str, Any]]:
    """Every combination of the listed values, the first key varying slowest (the order trials run in)."""
    points: list[dict[str, Any]] = [{}]
    for key, dim in space.items():
        points = [{**p, key: v} for p in points for v in dim.values]
    return points


def open_study(store, name: str, direction: str, sampler, pruner, definition: dict, space: dict[str, Dim], trials: int,
               where: str, wait_s: float = 120.0):
    """Create the study, or join it. Its creator puts a grid's points in Optuna's trial queue, in order, before it
    records the sweep's definition: workers pop queued trials atomically, so two processes never run one point
    (Optuna's grid sampler picks points at random and may run one twice in parallel). A joining process waits for
    the definition, then checks it is the same sweep."""
    import optuna

    try:
        study = optuna.create_study(study_name=name, storage=store, sampler=sampler, pruner=pruner, direction=direction)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=store, sampler=sampler, pruner=pruner)
        deadline = time.monotonic() + wait_s
        while studies.DEFINITION not in study.user_attrs:
            if time.monotonic() > deadline:
                raise ConfigError(f"study {name!r} in {where} was never set up (its first process stopped while creating it): "
                                  "remove it (the journal file) or give another --study") from None
            time.sleep(0.5)
        studies.check_definition(study, definition, where)
        return study
    if is_grid(space):
        for point in grid_points(space)[:trials]:
            study.enqueue_trial(point)
    studies.check_definition(study, definition, where)  # records it: the study is ready
    return study


def settings_text(settings: dict[str, Any]) -> str:
    """'learning_rate=0.0015529 beta=0.5' (floats to 6 significant digits)."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def settings_of(trial, space: dict[str, Dim]) -> dict[str, Any]:
    """A trial's searched values (a queued trial's from its fixed parameters)."""
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    return {k: params[k] for k in space if k in params}


def prune_note(study, trial_number: int, k: int, step: int, value: float, objective: str) -> str:
    """'pruned at step 6 (evaluation 1): preference accuracy 41.2% below the median 58.8% of 2 finished trials'."""
    from optuna.trial import TrialState

    key, direction, label = OBJECTIVES[objective]
    others = [t.intermediate_values[k] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if k in t.intermediate_values and t.number != trial_number]
    pct = objective != "loss"
    median = format_metric(statistics.median(others), pct) if others else "-"
    word = "below" if direction == "maximize" else "above"
    return (f"pruned at step {step} (evaluation {k}): {label} {format_metric(value, pct)} {word} the median {median} "
            f"of {len(others)} finished trial(s) at their evaluation {k}")


def trial_result(metrics: dict, objective: str, steps: int, wall: float) -> dict:
    """What the table shows of a trial: the objective with its standard error, both accuracies, steps, time."""
    key = OBJECTIVES[objective][0]
    return {"value": metrics.get(key), "se": metrics.get(f"{key}_se"), "accuracy": metrics.get("rewards/accuracies"),
            "accuracy_se": metrics.get("rewards/accuracies_se"), "balanced": metrics.get("length_balanced_accuracy"),
            "balanced_se": metrics.get("length_balanced_accuracy_se"), "steps": steps, "wall_s": round(wall, 1)}


def make_objective(base: Config, space: dict[str, Dim], out: Path, objective: str, finish):
    """Optuna's objective: one ordinary training run in OUT/trial-NNN, scored on the validation split."""
    import optuna

    from ..training.checkpoint import NonFiniteError
    from ..training.engine import isolated
    from ..training.loop import fit, set_up

    key, _, label = OBJECTIVES[objective]

    def run_trial(trial) -> float:
        studies.claim(trial)
        params = {d.key: d.suggest(trial) for d in space.values()}
        folder = out / f"trial-{trial.number:03d}"
        trial.set_user_attr("folder", str(folder))
        config = make_config(base, {**params, "output_dir": str(folder)})
        log.info("trial %d: %s -> %s", trial.number, settings_text(params), folder)
        started, evals = time.perf_counter(), []
        with isolated(), studies.Heartbeat(trial):
            run = None

            def on_line(step: int, values: dict) -> None:  # every metrics.jsonl line: the evaluations for the pruner
                value = values.get(f"eval_{key}")
                if step == 0 or step >= run.total_steps or not isinstance(value, (int, float)):
                    return  # before training, the final evaluation (the trial's value) and unmeasured metrics
                evals.append(step)
                trial.report(value, len(evals))
                trial.set_user_attr("eval_steps", evals)
                if trial.should_prune():
                    note = prune_note(trial.study, trial.number, len(evals), step, value, objective)
                    trial.set_user_attr("note", note)
                    metrics = {k[len("eval_"):]: v for k, v in values.items() if k.startswith("eval_")}
                    trial.set_user_attr("result", trial_result(metrics, objective, step, time.perf_counter() - started))
                    raise optuna.TrialPruned(note)

            try:
                run = set_up(config)
                run.metrics_log.listeners.append(on_line)
                summary = fit(run, finish, started)
            except optuna.TrialPruned:
                raise
            except Exception as exc:
                trial.set_user_attr("note", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                if isinstance(exc, NonFiniteError):
                    trial.set_user_attr("result", trial_result({}, objective, run.state.step, time.perf_counter() - started))
                raise
            finally:
                if run is not None:
                    run.metrics_log.close()
        result = trial_result(summary["after"], objective, summary["steps"], time.perf_counter() - started)
        trial.set_user_attr("result", result)
        if not isinstance(result["value"], (int, float)) or not math.isfinite(result["value"]):
            note = f"failed: {label} is undefined on the validation split"
            if key == "length_balanced_accuracy":
                note += " (every pair's chosen response is the longer, or every pair's the shorter)"
            trial.set_user_attr("note", note)
            raise Unscorable(note)
        log.info("trial %d: %s %s in %d steps, %.1f min", trial.number, label,
                 format_metric(result["value"], objective != "loss", result["se"]), result["steps"], result["wall_s"] / 60)
        return float(result["value"])

    return run_trial


def enough(study, target: int, grid: bool) -> bool:
    """True when there is nothing left for this process to start: a grid's queue is empty (its points and the
    reruns of dead trials are queued), or the study has `target` finished trials (complete or pruned), counting
    those running elsewhere."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    if grid:
        return TrialState.WAITING not in states
    done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    return done + sum(s == TrialState.RUNNING for s in states) >= target


def run_sweep(config: Config, space: dict[str, Dim], *, out: str | Path, trials: int | None = None, timeout: float | None = None,
              objective: str = "accuracy", validation_size: float = 0.1, storage: str | None = None, study_name: str | None = None,
              fixed: dict[str, Any] | None = None, prune_after: int = 2, prune: bool = True, stale_after: float = 600.0,
              finish=None) -> SweepResult:
    """Run (or resume, or join) a sweep and write its results; see the module docstring. `fixed`: the keys set on
    the command line (a searched key may not be one of them). `finish`: what runs on each finished trial folder
    (orpo sweep: report.html and the model card, as orpo train)."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("orpo sweep needs Optuna: pip install 'orpo[sweep]'") from None

    from ..training.checkpoint import NonFiniteError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("orpo sweep runs one process per trial: start one sweep per GPU (CUDA_VISIBLE_DEVICES=i) on the same "
                          "--out or --storage, each pulls its own trials, instead of a distributed launch")
    out = Path(out)
    base = base_config(config, out, validation_size)
    check_objective(base, objective)
    space = check_space(space, base, fixed or {})
    grid = is_grid(space)
    if trials is None:
        if not grid:
            raise ConfigError("give --trials N: the space has a range, so it has no end of its own (a grid of lists does)")
        trials = grid_size(space)
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if grid and trials > grid_size(space):
        log.info("the grid has %d points: %d trials", grid_size(space), grid_size(space))
        trials = grid_size(space)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = studies.open_storage(storage, out)
    name = study_name or "orpo-sweep"
    direction = OBJECTIVES[objective][1]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=prune_after, n_warmup_steps=0) if prune else optuna.pruners.NopPruner()
    definition = {"space": {k: d.describe() for k, d in space.items()}, "objective": objective, "trials": trials,
                  "config": json.loads(base.model_copy(update={"output_dir": "-"}).model_dump_json())}
    where = storage or str(out / "study.journal")
    sampler = make_sampler(space, config.seed, 0)
    study = open_study(store, name, direction, sampler, pruner, definition, space, trials, where)
    studies.reap(study, stale_after)
    if not grid:  # reseeded by the trials already there: a resumed TPE does not repeat its first draws
        study.sampler = make_sampler(space, config.seed, len(study.get_trials(deepcopy=False)))
    if enough(study, trials, grid):
        log.info("study %s has no trial left to start (%d asked): nothing to run", name, trials)
    else:
        import torch

        def stop_when_enough(study, _trial) -> None:
            studies.reap(study, stale_after)
            if enough(study, trials, grid):
                study.stop()

        study.optimize(make_objective(base, space, out, objective, finish), timeout=timeout, callbacks=[stop_when_enough],
                       catch=(NonFiniteError, Unscorable, torch.OutOfMemoryError), gc_after_trial=True)
    return write_results(study, base, space, out, objective)


# ---------------------------------------------------------------- results


def trial_rows(study, space: dict[str, Dim], objective: str) -> list[dict]:
    """One row per trial, in trial order, from the study alone (trials run on other machines included)."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs = t.user_attrs
        note = attrs.get("note", "")
        if "rerun_of" in attrs:
            note = f"rerun of trial {attrs['rerun_of']}" + (f"; {note}" if note else "")
        rows.append({"trial": t.number, "state": t.state.name.lower(), "settings": settings_of(t, space),
                     **attrs.get("result", {}), "host": attrs.get("host"), "folder": attrs.get("folder"), "note": note})
    return rows


def table_text(rows: list[dict], objective: str) -> str:
    """The trials as a markdown table: the objective ± SE, then the plain and length-balanced accuracy where the
    objective is not one of them."""
    key, _, label = OBJECTIVES[objective]
    pct = objective != "loss"
    extra = [(name, k) for name, k, metric in (("preference accuracy", "accuracy", "rewards/accuracies"),
                                                ("length-balanced", "balanced", "length_balanced_accuracy")) if metric != key]
    lines = [f"| trial | state | settings | {label} ± SE | " + "".join(f"{name} | " for name, _ in extra) + "steps | time | note |",
             "|---|---|---|---|" + "---|" * len(extra) + "---|---|---|"]
    for r in rows:
        shown = settings_text(r["settings"])
        wall = f"{r['wall_s'] / 60:.1f} min" if isinstance(r.get("wall_s"), (int, float)) else "-"
        cells = "".join(f"{format_metric(r.get(k), True, r.get(f'{k}_se'))} | " for _, k in extra)
        lines.append(f"| {r['trial']} | {r['state']} | {shown} | {format_metric(r.get('value'), pct, r.get('se'))} | {cells}"
                     f"{r.get('steps', '-')} | {wall} | {r['note']} |")
    return "\n".join(lines)


def write_best(base: Config, best, space: dict[str, Dim], out: Path, objective: str) -> Path:
    """best.yaml: the best trial's whole config, output_dir OUT/best; `orpo train best.yaml` reproduces the trial."""
    config = make_config(base, {**settings_of(best, space), "output_dir": str(out / "best")})
    path = out / "best.yaml"
    save_config(config, path)
    result = best.user_attrs.get("result", {})
    label = OBJECTIVES[objective][2]
    head = (f"# orpo sweep {out}: trial {best.number}, {label} {format_metric(result.get('value'), objective != 'loss', result.get('se'))} "
            f"on the validation split.\n# `orpo train {path}` reproduces it (data.validation_size keeps the validation rows out of "
            "training; set it to 0 to train on them too).\n")
    path.write_text(head + path.read_text())
    return path


def measure_test(base: Config, best, out: Path) -> dict:
    """The best trial and its base model on the test split, once: test.json is reused while the best trial is the
    same. A best trial that ran on another machine is not measured here (its folder is there)."""
    from ..after.eval import evaluate_target
    from ..after.runs import Target, is_run, resolve
    from ..training.tracking import dump_json

    path = out / "test.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("trial") == best.number and "after" in old:
            return old
    folder = Path(best.user_attrs.get("folder", ""))
    if not is_run(folder):
        return {"trial": best.number, "missing": f"trial {best.number}'s run folder {folder} is not on this machine "
                f"(it ran on {best.user_attrs.get('host')}): run this sweep there to measure it on the test split"}
    target = resolve(str(folder), ["data.validation_size=0"])  # the held-out split the validation rows were not taken from
    plain = target.config.model_copy(update={"lora": target.config.lora.model_copy(update={"enabled": False})})
    log.info("measuring trial %d and its base model on the test split (once)", best.number)
    before = evaluate_target(Target(target.config.model.name_or_path, "base", plain), samples=0, generate=base.data.builtin)
    after = evaluate_target(target, samples=0, generate=base.data.builtin)
    record = {"trial": best.number, "folder": str(folder), "before": before, "after": after}
    for side in ("before", "after"):
        record[side].pop("samples", None)
    dump_json(record, path)
    return record


def test_text(test: dict | None) -> str:
    """The test split's lines under the table."""
    from ..training.heldout import change_cell

    if test is None:
        return "No test split was set aside (trials were scored on the held-out split itself): nothing measured on test."
    if "missing" in test:
        return test["missing"]
    b, a = test["before"], test["after"]
    lines = [f"Test split ({a.get('pairs')} pairs, never part of a choice), trial {test['trial']} against its base model:"]
    for label, key in (("preference accuracy", "rewards/accuracies"), ("length-balanced accuracy", "length_balanced_accuracy"),
                       ("task accuracy", "task_accuracy")):
        if isinstance(a.get(key), (int, float)):
            lines.append(f"- {label}: {format_metric(b.get(key), True, b.get(f'{key}_se'))} -> "
                         f"{format_metric(a.get(key), True, a.get(f'{key}_se'))} ({change_cell(b, a, key, True)})")
    return "\n".join(lines)


def write_results(study, base: Config, space: dict[str, Dim], out: Path, objective: str) -> SweepResult:
    """trials.md and trials.json, best.yaml, compare.html over the finished trials, test.json; the result."""
    from optuna.trial import TrialState

    from ..after.compare import compare_runs
    from ..after.runs import is_run
    from ..training.tracking import dump_json

    rows = trial_rows(study, space, objective)
    files: dict[str, str] = {}
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = test = best_row = None
    if done:
        best = study.best_trial
        best_row = next(r for r in rows if r["trial"] == best.number)
        files["best"] = str(write_best(base, best, space, out, objective))
        if has_test(base):
            test = measure_test(base, best, out)
    local = [r["folder"] for r in rows if r["state"] == "complete" and r["folder"] and is_run(Path(r["folder"]))]
    if local:
        files["compare"] = str(compare_runs(local, str(out / "compare.html"))[1])
    key, direction, label = OBJECTIVES[objective]
    states = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running", "waiting")}
    head = [f"# orpo sweep {out} (study {study.study_name!r}, {socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M')})", "",
            f"Objective: {label} on the validation split ({direction}), ± one standard error. Trials: "
            + ", ".join(f"{n} {s}" for s, n in states.items() if n) + ".", ""]
    best_line = (f"Best: trial {best.number} ({' '.join(f'{k}={v}' for k, v in best_row['settings'].items())}), config {files['best']}"
                 if best else "No trial completed: no best config.")
    text = "\n".join(head + [table_text(rows, objective), "", best_line, "", test_text(test) if best else ""]).rstrip() + "\n"
    (out / "trials.md").write_text(text)
    dump_json({"objective": objective, "direction": direction, "trials": rows, "best": best_row, "test": test}, out / "trials.json")
    files |= {"table": str(out / "trials.md"), "json": str(out / "trials.json")}
    return SweepResult(out, rows, best_row, test, text, files)
