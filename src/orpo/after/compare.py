"""`orpo compare RUN [RUN ...]`: what differs between runs and what it did, in one self-contained HTML page.

A sweep is a few `orpo train cfg.yaml beta=0.05 output_dir=runs/b05`, then `orpo compare runs/*`. The page has
the config keys whose values differ (dotted names, as overrides are written; `output_dir` is not listed: it names
the columns), the held-out metrics before and after training with their standard errors, and each training and
evaluation curve with every run overlaid. The same tables are printed as text.

A run is a folder with config.yaml (`orpo train`'s output_dir, finished or not). Anything else among the folders
given (a merged model beside the runs, as `runs/*` picks up `runs/orpo-merged`; a model folder; a file) is skipped
with one line on stderr saying why; none left is an error (one run alone is shown, as before).
"""

from __future__ import annotations

import base64
import html
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..training.heldout import HELD_OUT_ROWS, change_cell, metric_cell
from .report import STYLE, curves_png, duration, read_metrics, series
from .runs import MERGED_CONFIG

# (title, y-axis label, metric key): drawn for every run, train solid and eval (eval_KEY) dashed.
CURVES = [
    ("loss", "loss", "loss"),
    ("NLL (chosen)", "NLL per token", "nll_loss"),
    ("preference accuracy", "share of pairs", "rewards/accuracies"),
    ("reward margin (chosen - rejected)", "margin", "rewards/margins"),
    ("log-odds ratio term (log sigmoid z)", "log sigmoid z", "log_odds_ratio"),
    ("log-odds of chosen over rejected (z)", "z", "log_odds_chosen"),
]
NOT_COMPARED = ("output_dir",)


@dataclass
class Run:
    name: str  # the column header and legend label (compare_runs shortens the folder)
    config: dict[str, object]  # dotted key -> value
    summary: dict
    lines: list[dict]  # metrics.jsonl
    folder: str = ""  # as given


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'lora': {'r': 16}} -> {'lora.r': 16}."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_run(folder: str) -> Run:
    path = Path(folder)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{folder}: not a run folder (no config.yaml)")
    config = flatten(yaml.safe_load((path / "config.yaml").read_text()) or {})
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    return Run(folder, config, summary, read_metrics(path), folder)


def not_a_run(folder: str) -> str | None:
    """Why `folder` is no run to compare, or None for a run (config.yaml: finished or not)."""
    path = Path(folder)
    if (path / "config.yaml").is_file():
        return None
    if not path.exists():
        return "no such file or folder"
    if not path.is_dir():
        return "a file, not a run folder"
    if (path / MERGED_CONFIG).is_file():
        return "a merged model (orpo merge's output), not a run folder"
    if (path / "config.json").is_file():
        return "a model folder, not a run folder"
    return "not a run folder (no config.yaml)"


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (a key missing from a run counts as differing)."""
    keys = sorted({k for r in runs for k in r.config} - set(NOT_COMPARED))
    missing = object()
    return [k for k in keys if len({json.dumps(r.config.get(k, missing), default=str) for r in runs}) > 1]


def show(value) -> str:
    return "(unset)" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def metric_rows(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(label, one cell per run) for the held-out metrics: 'before -> after (change)'."""
    rows = []
    for label, key, pct in HELD_OUT_ROWS:
        if not any(key in r.summary.get("after", {}) for r in runs):
            continue
        cells = []
        for r in runs:
            before, after = r.summary.get("before", {}), r.summary.get("after", {})
            if key not in after:
                cells.append("-")
                continue
            change = change_cell(before, after, key, pct)
            cells.append(f"{metric_cell(before, key, pct)} -> {metric_cell(after, key, pct)}" + (f" ({change})" if change else ""))
        rows.append((label, cells))
    return rows


def facts(r: Run) -> str:
    s = r.summary
    parts = [f"{s['steps']} steps" if "steps" in s else "unfinished (no summary.json)"]
    if "wall_seconds" in s:
        parts.append(duration(s["wall_seconds"]))
    if "data" in s:
        parts.append(f"{s['data'].get('train_pairs', '?')} training / {s['data'].get('eval_pairs', '?')} held-out pairs")
    return ", ".join(parts)


def plots(runs: list[Run]) -> list[tuple[str, bytes]]:
    out = []
    for title, ylabel, key in CURVES:
        curves = []
        for i, r in enumerate(runs):
            curves.append((f"{r.name}", f"C{i}", False, *series(r.lines, key)))
            curves.append((f"{r.name} (eval)", f"C{i}", True, *series(r.lines, f"eval_{key}")))
        png = curves_png(curves, title, ylabel)
        if png is not None:
            out.append((title, png))
    return out


def table_html(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def page(runs: list[Run]) -> str:
    names = [r.name for r in runs]
    keys = differing_keys(runs)
    config_rows = [[k, *[show(r.config.get(k)) for r in runs]] for k in keys]
    config = table_html(["config key", *names], config_rows) if keys else "<p>The configs are the same (output_dir aside).</p>"
    metrics = table_html(["held-out metric", *names], [[label, *cells] for label, cells in metric_rows(runs)])
    images = "".join(f"<img alt='{html.escape(t)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>" for t, png in plots(runs))
    runs_table = table_html(["run", "folder", "what it did"], [[r.name, r.folder, facts(r)] for r in runs])
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>orpo compare</title>"
        f"<style>{STYLE}</style></head><body><h1>orpo compare: {len(runs)} runs</h1>{runs_table}"
        f"<h2>Config keys that differ</h2>{config}"
        f"<h2>Held-out metrics: before -> after (change)</h2>{metrics}"
        "<p class=note>± one binomial standard error of the share; for a change, the two combined.</p>"
        f"<h2>Curves</h2><div class='plots'>{images or '<p>No metrics logged.</p>'}</div></body></html>"
    )


def text(runs: list[Run]) -> str:
    """The two tables for the terminal."""
    names = [r.name for r in runs]
    rows = [["config key", *names]] + [[k, *[show(r.config.get(k)) for r in runs]] for k in differing_keys(runs)]
    rows += [["", *[""] * len(runs)], ["held-out metric", *names]] + [[label, *cells] for label, cells in metric_rows(runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def short_names(folders: list[str]) -> list[str]:
    """The folders without the part all of them share (runs/b05, runs/b1 -> b05, b1), as given when that would
    leave a name empty or the same twice."""
    paths = [Path(f).resolve() for f in folders]
    if len(paths) < 2:
        return [Path(f).name or f for f in folders]
    common = Path(os.path.commonpath(paths))
    names = [str(p.relative_to(common)) for p in paths]
    return names if all(n != "." for n in names) and len(set(names)) == len(names) else list(folders)


def compare_runs(folders: list[str], out: str) -> tuple[list[Run], Path]:
    """Read the runs (named by what their folders do not share) and write the page to `out`: (runs, page path).
    Folders that are not runs are skipped, one line each on stderr; no run left: FileNotFoundError."""
    kept = []
    for folder in folders:
        why = not_a_run(folder)
        if why:
            print(f"skipped {folder}: {why}", file=sys.stderr)
        else:
            kept.append(folder)
    if not kept:
        raise FileNotFoundError(f"no run folder among the {len(folders)} given "
                                "(a run folder holds config.yaml, as orpo train's output_dir)")
    runs = [load_run(f) for f in kept]
    for run, name in zip(runs, short_names(kept), strict=True):
        run.name = name
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(runs))
    return runs, path
