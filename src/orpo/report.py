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

from .evaluate import HELD_OUT_ROWS, format_metric

# (file stem, title, metric keys drawn together); each key is drawn for train and, prefixed eval_, for eval.
PLOTS = [
    ("loss", "loss", ["loss"]),
    ("nll_loss", "NLL (chosen)", ["nll_loss"]),
    ("log_odds_ratio", "log-odds ratio term (log sigmoid z)", ["log_odds_ratio"]),
    ("rewards", "rewards (beta * mean logp)", ["rewards/chosen", "rewards/rejected"]),
    ("margins", "reward margin (chosen - rejected)", ["rewards/margins"]),
    ("accuracies", "preference accuracy", ["rewards/accuracies"]),
    ("learning_rate", "learning rate", ["learning_rate"]),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(lines: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; missing and null (non-finite) values are skipped."""
    points = [(m["step"], m[key]) for m in lines if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return [s for s, _ in points], [v for _, v in points]


def plot(lines: list[dict], title: str, keys: list[str]) -> bytes | None:
    """One PNG: each key's train curve (solid) and eval points (dashed, markers); None when nothing to draw."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), dpi=100)
    ax = fig.add_subplot()
    drawn = 0
    for i, key in enumerate(keys):
        colour = f"C{i}"
        for name, style in ((key, dict(linestyle="-")), (f"eval_{key}", dict(linestyle="--", marker="o"))):
            steps, values = series(lines, name)
            if steps:
                ax.plot(steps, values, color=colour, label=("eval " if name.startswith("eval_") else "train ") + key, **style)
                drawn += 1
    if not drawn:
        return None
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plots(run_dir: Path, out: Path | None = None) -> dict[str, Path]:
    """PNG per plot under `out` (default RUN_DIR/plots/); returns {stem: path} of those with data."""
    lines = read_metrics(run_dir)
    out = run_dir / "plots" if out is None else out
    written = {}
    for stem, title, keys in PLOTS:
        png = plot(lines, title, keys)
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
        change = ""
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            change = f"{100 * (a - b):+.1f} pt" if pct else f"{a - b:+.4f}"
        rows.append(f"<tr><td>{label}</td><td>{format_metric(b, pct)}</td><td>{format_metric(a, pct)}</td><td>{change}</td></tr>")
    return "<table><tr><th>held-out metric</th><th>before</th><th>after</th><th>change</th></tr>" + "".join(rows) + "</table>"


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
.plots img{width:560px;border:1px solid #eee}pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}"""


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/plots/*.png and RUN_DIR/report.html; returns the html path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no metrics.jsonl or summary.json)")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    plots = write_plots(run_dir)
    images = "".join(
        f"<img alt='{stem}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
        for stem, path in plots.items()
    )
    data = summary.get("data", {})
    facts = (f"<p>{data.get('train_pairs', '?')} training pairs, {data.get('eval_pairs', '?')} held-out pairs, "
             f"{summary.get('steps', '?')} of {summary.get('total_steps', '?')} steps; dropped: "
             f"{html.escape(json.dumps(data.get('dropped', {})))}</p>")
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


def run_report(run_dir: str) -> int:
    """`orpo report RUN_DIR`."""
    path = write_report(run_dir)
    print(f"report: {path}  (plots in {Path(run_dir) / 'plots'})")
    return 0
