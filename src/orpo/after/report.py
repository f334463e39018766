"""A run's report: PNG training curves (train and eval, from metrics.jsonl) and one self-contained
report.html (plots embedded as base64, the before/after table and generation samples from summary.json).

Written by every `orpo train` at the end, and rebuilt by `orpo report RUN_DIR`. matplotlib draws through
its object API (`Figure`, Agg canvas), so no global pyplot state or display is involved.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from ..config import BUILTIN, BUILTIN_HUB_ID
from ..data.sources import dropped_words
from ..training.heldout import HELD_OUT_ROWS, change_cell, metric_cell

# (file stem, title, y-axis label, metric keys drawn together); each key is drawn for train and, prefixed eval_,
# for eval.
PLOTS = [
    ("loss", "loss", "loss", ["loss"]),
    ("nll_loss", "NLL (chosen)", "NLL per token", ["nll_loss"]),
    ("log_odds_ratio", "log-odds ratio term (log sigmoid z)", "log sigmoid z", ["log_odds_ratio"]),
    ("log_odds_chosen", "log-odds of chosen over rejected (z)", "z", ["log_odds_chosen"]),
    ("logps", "mean log-prob per response token", "log p per token", ["logps/chosen", "logps/rejected"]),
    ("rewards", "rewards (beta * mean logp)", "reward", ["rewards/chosen", "rewards/rejected"]),
    ("margins", "reward margin (chosen - rejected)", "margin", ["rewards/margins"]),
    ("accuracies", "preference accuracy", "share of pairs", ["rewards/accuracies"]),
    ("learning_rate", "learning rate", "learning rate", ["learning_rate"]),
    ("grad_norm", "gradient norm (before clipping)", "L2 norm", ["grad_norm"]),
    ("tokens_per_second", "throughput", "tokens / s", ["tokens_per_second"]),
]


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's lines. A last line cut short (a run killed while writing it, never resumed) is left out;
    a broken line anywhere else is an error."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    found = []
    for number, line in enumerate(lines, 1):
        try:
            found.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON") from None
    return found


def series(lines: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; missing and null (non-finite) values are skipped."""
    points = [(m["step"], m[key]) for m in lines if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return [s for s, _ in points], [v for _, v in points]


def plot(lines: list[dict], title: str, keys: list[str], ylabel: str = "") -> bytes | None:
    """One PNG: each key's train curve (solid) and eval points (dashed, markers); None when nothing to draw."""
    curves = []
    for i, key in enumerate(keys):
        for name in (key, f"eval_{key}"):
            steps, values = series(lines, name)
            curves.append((("eval " if name.startswith("eval_") else "train ") + key, f"C{i}", name.startswith("eval_"), steps, values))
    return curves_png(curves, title, ylabel)


def curves_png(curves: list[tuple[str, str, bool, list[int], list[float]]], title: str, ylabel: str) -> bytes | None:
    """(label, colour, is_eval, steps, values) -> one PNG, eval curves dashed with markers; None when every curve
    is empty. Steps are whole numbers on the x axis however short the run."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves = [c for c in curves if c[3]]
    if not curves:
        return None
    fig = Figure(figsize=(5.6, 3.4), dpi=100)
    ax = fig.add_subplot()
    for label, colour, is_eval, steps, values in curves:
        style = dict(linestyle="--", marker="o") if is_eval else dict(linestyle="-")
        ax.plot(steps, values, color=colour, label=label, **style)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plots(run_dir: Path, out: Path | None = None, lines: list[dict] | None = None) -> dict[str, Path]:
    """PNG per plot under `out` (default RUN_DIR/plots/) from `lines` (default: RUN_DIR's metrics.jsonl);
    returns {stem: path} of those with data."""
    lines = read_metrics(run_dir) if lines is None else lines
    out = run_dir / "plots" if out is None else out
    written = {}
    for stem, title, ylabel, keys in PLOTS:
        png = plot(lines, title, keys, ylabel)
        if png is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{stem}.png").write_bytes(png)
            written[stem] = out / f"{stem}.png"
    return written


def before_after_html(summary: dict) -> str:
    before, after = summary.get("before", {}), summary.get("after", {})
    if not after and not before:
        return "<p>No held-out evaluation in summary.json.</p>"
    rows = []
    for label, key, pct in HELD_OUT_ROWS:
        b, a = before.get(key), after.get(key)
        if b is None and a is None:
            continue
        cells = (metric_cell(before, key, pct), metric_cell(after, key, pct), change_cell(before, after, key, pct))
        rows.append(f"<tr><td>{label}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    note = "<p class=note>± one binomial standard error (for a change, the two combined).</p>" if "rewards/accuracies_se" in after else ""
    return "<table><tr><th>held-out metric</th><th>before</th><th>after</th><th>change</th></tr>" + "".join(rows) + "</table>" + note


def samples_html(summary: dict) -> str:
    before, after = summary.get("before", {}).get("samples", []), summary.get("after", {}).get("samples", [])
    if not before and not after:
        return ""

    def cell(sample: dict | None) -> str:
        if sample is None:
            return "<td></td>"
        mark = {True: " class='ok'", False: " class='bad'"}.get(sample.get("correct"), "")
        return f"<td{mark}><code>{html.escape(sample['reply'])}</code></td>"

    rows = []
    for i in range(max(len(before), len(after))):
        b = before[i] if i < len(before) else None
        a = after[i] if i < len(after) else None
        prompt = (a or b)["prompt"]
        rows.append(f"<tr><td>{html.escape(prompt)}</td>{cell(b)}{cell(a)}</tr>")
    return ("<h2>Generation samples (held-out, greedy)</h2><table><tr><th>prompt</th><th>before</th><th>after</th></tr>"
            + "".join(rows) + "</table>")


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1180px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}
th{background:#f2f2f2}.ok{background:#e6f6e6}.bad{background:#fbe9e9}.plots{display:flex;flex-wrap:wrap;gap:8px}
.plots img{width:560px;border:1px solid #eee}pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}.note{color:#555;font-size:13px}"""


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def header_html(summary: dict, config_text: str, lines: list[dict]) -> str:
    """What a reader checks first: base model, data (name, counts, drops in words), steps, time, throughput,
    hardware, versions. Each from summary.json / config.yaml; '?' where the run did not record it."""
    import yaml

    config = yaml.safe_load(config_text) or {} if config_text else {}
    model, data_cfg, data = config.get("model", {}), config.get("data", {}), summary.get("data", {})
    sources = [m.get("path") for m in data_cfg.get("mixture", [])] or [data_cfg.get("path", "?")]
    tokens, wall = summary.get("tokens"), summary.get("wall_seconds")
    base = str(model.get("name_or_path", "?"))
    training = [m["tokens_per_second"] for m in lines if isinstance(m.get("tokens_per_second"), (int, float))]
    speed = [f"{sum(training) / len(training):,.0f} tokens/s while training (mean of the logged windows)"] if training else []
    if tokens and wall:
        speed.append(f"{tokens / wall:,.0f} tokens/s over the whole run ({tokens:,} tokens, evaluations and loading included)")
    rows = [
        ("base model", f"<code>{html.escape(base)}</code>" + (f" ({BUILTIN_HUB_ID}, embedded)" if base == BUILTIN else "")
         + (" (LoRA r={r}, alpha={alpha})".format(**config["lora"]) if config.get("lora", {}).get("enabled") else " (full fine-tuning)" if config else "")
         + (", 4-bit" if model.get("load_in_4bit") else "")),
        ("data", ", ".join(f"<code>{html.escape(str(s))}</code>" + (" (orpo's generated preference tasks)" if s == BUILTIN else "") for s in sources)
         + f": {data.get('train_pairs', '?')} training pairs, {data.get('eval_pairs', '?')} held-out pairs"),
        ("dropped", html.escape(dropped_words(data.get("dropped", {})))),
        ("steps", f"{summary.get('steps', '?')} of {summary.get('total_steps', '?')}"
         + (f" ({summary['skipped_steps']} skipped: not finite)" if summary.get("skipped_steps") else "")),
        ("wall time", duration(wall) if isinstance(wall, (int, float)) else "?"),
        ("throughput", "; ".join(speed) or "?"),
        ("hardware", html.escape(str(summary.get("hardware", "?")))),
        ("versions", html.escape(", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items()) or "?")),
    ]
    return "<table class='facts'>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/plots/*.png and RUN_DIR/report.html; returns the html path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no metrics.jsonl or summary.json)")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    lines = read_metrics(run_dir)
    plots = write_plots(run_dir, lines=lines)
    images = "".join(
        f"<img alt='{stem}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
        for stem, path in plots.items()
    )
    facts = header_html(summary, config, lines)
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ORPO run {html.escape(run_dir.name)}</title>"
        f"<style>{STYLE}</style></head><body><h1>ORPO run: {html.escape(str(run_dir))}</h1>{facts}"
        f"<h2>Held-out evaluation</h2>{before_after_html(summary)}"
        f"<h2>Training curves</h2><div class='plots'>{images or '<p>No metrics logged.</p>'}</div>"
        f"{samples_html(summary)}"
        f"<h2>Config</h2><pre>{html.escape(config)}</pre></body></html>"
    )
    path = run_dir / "report.html"
    path.write_text(page)
    return path


def inline_report(run_dir: str | Path) -> str:
    """The report as an HTML fragment for a notebook (orpo.Run's _repr_html_): the before/after table and the
    loss, accuracy and margin curves, drawn from the run's files; no style sheet (it would restyle the notebook)."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    lines = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    images = []
    for stem, title, ylabel, keys in PLOTS:
        png = plot(lines, title, keys, ylabel) if stem in ("loss", "accuracies", "margins") else None
        if png is not None:
            images.append(f"<img style='max-width:32%' alt='{stem}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    return (f"<div><h3>ORPO run {html.escape(str(run_dir))}</h3>{before_after_html(summary)}"
            f"<div>{''.join(images)}</div></div>")


def run_report(run_dir: str) -> int:
    """`orpo report RUN_DIR`."""
    path = write_report(run_dir)
    print(f"report: {path}  (plots in {Path(run_dir) / 'plots'})")
    return 0
