"""report.html and plots: written by train, rebuilt by `orpo report`, self-contained."""

from __future__ import annotations

import base64
import json
import re
import subprocess

import pytest

from conftest import PAIRS, tiny_overrides, write_jsonl
from orpo.after.report import PLOTS, write_report
from orpo.cli import main

# Appended to a copy of report.html: after load, every image's state as JSON in <pre id='probe'>.
PROBE = """<script>window.addEventListener('load', () => {
  const seen = [...document.images].map(img => { const box = img.getBoundingClientRect(), style = getComputedStyle(img);
    return {alt: img.alt, complete: img.complete, natural: img.naturalWidth, width: box.width, height: box.height,
            shown: style.visibility === 'visible' && style.display !== 'none' && Number(style.opacity) > 0}; });
  const out = document.createElement('pre'); out.id = 'probe'; out.textContent = JSON.stringify(seen); document.body.append(out);
});</script>"""


@pytest.fixture(scope="module")
def report_run(chat_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "run"
    data = write_jsonl(tmp / "pairs.jsonl", PAIRS * 4)
    assert main(["train", *tiny_overrides(chat_model_dir, data, out, eval_steps=2, max_new_tokens=4, logging_steps=2, max_steps=4)]) == 0
    return out


def test_train_writes_the_report_and_orpo_report_rebuilds_it(report_run, capsys):
    out = report_run
    page = (out / "report.html").read_text()
    assert {p.stem for p in (out / "plots").glob("*.png")} == {stem for stem, _, _, _ in PLOTS}
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == len(PLOTS) and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "src='http" not in page and "<script" not in page  # self-contained, nothing fetched
    assert "preference accuracy" in page and "before" in page
    for fact in ("base model", "training pairs", "dropped</th><td>none", "wall time", "tokens/s", "hardware", "torch 2.", "orpo "):
        assert fact in page, fact
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 4]  # step 1 too: the warm-up's first learning rate
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file() and "report:" in capsys.readouterr().out


def test_report_escapes_samples_and_handles_missing_parts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "learning_rate": None}) + "\n")
    (run / "summary.json").write_text(json.dumps({"after": {"rewards/accuracies": 0.5, "samples": [
        {"prompt": "<b>hi</b>", "reply": "<script>x</script>", "correct": False}]}}))
    page = write_report(run).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert [p.name for p in (run / "plots").glob("*.png")] == ["loss.png"]  # nothing else was logged


def test_report_of_a_non_run_fails(tmp_path):
    assert main(["report", str(tmp_path)]) == 1


def test_drops_and_durations_in_words():
    from orpo.after.report import duration
    from orpo.data.sources import dropped_words

    assert dropped_words({}) == "none"
    assert dropped_words({"train/too_long": 3, "read/tie": 1}) == (
        "1 rows read: chosen and rejected scored alike; 3 training pairs: longer than max_length")
    assert (duration(42), duration(185), duration(7260)) == ("42 s", "3 min 5 s", "2 h 1 min")


def test_report_renders_in_headless_chromium(chromium, report_run, tmp_path):
    """The page as a browser shows it: every plot decodes (natural width > 0) and is laid out visible. No browser:
    skipped here, failed under CI (conftest.chromium)."""
    page = tmp_path / "report.html"
    page.write_text((report_run / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    shown = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                            "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", shown.stdout, re.S)
    assert found, shown.stderr[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(images) == len(list((report_run / "plots").glob("*.png"))) == len(PLOTS)
    for image in images:
        assert image["complete"] and image["natural"] > 0 and image["width"] > 100 and image["height"] > 50 and image["shown"], image


def test_a_torn_last_metrics_line_is_left_out(tmp_path):
    """A run killed while writing metrics.jsonl and never resumed still gets its report; a broken line elsewhere
    is an error naming the line."""
    run = tmp_path / "run"
    run.mkdir()
    whole = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(whole) + '\n{"step": 3, "lo')
    assert main(["report", str(run)]) == 0 and (run / "plots" / "loss.png").is_file()
    (run / "metrics.jsonl").write_text('{"step": 1, "lo\n' + "\n".join(whole) + "\n")
    assert main(["report", str(run)]) == 1


def test_preference_accuracy_carries_its_standard_error_everywhere(report_run, capsys):
    """summary.json, the eval table, report.html and the model card: the share of pairs ± its binomial
    standard error, sqrt(p (1 - p) / n) over the n held-out pairs."""
    import json
    import math

    from orpo.after.eval import table

    summary = json.loads((report_run / "summary.json").read_text())
    for side in ("before", "after"):
        m = summary[side]
        assert m["pairs"] == summary["data"]["eval_pairs"] == 4
        p = m["rewards/accuracies"]
        assert m["rewards/accuracies_se"] == pytest.approx(math.sqrt(p * (1 - p) / 4))
    shown = f"{100 * summary['after']['rewards/accuracies']:.1f}% ± {100 * summary['after']['rewards/accuracies_se']:.1f}"
    assert shown in table(["before", "after"], [summary["before"], summary["after"]])
    assert shown in (report_run / "report.html").read_text()
    assert shown in (report_run / "final" / "README.md").read_text()


def test_standard_error_cells():
    from orpo.training.heldout import change_cell, metric_cell, standard_error

    assert standard_error(0.5, 100) == pytest.approx(0.05) and standard_error(1.0, 8) == 0.0
    before = {"rewards/accuracies": 0.4, "rewards/accuracies_se": 0.03, "loss": 1.5}
    after = {"rewards/accuracies": 0.875, "rewards/accuracies_se": 0.04, "loss": 1.25}
    assert metric_cell(after, "rewards/accuracies", True) == "87.5% ± 4.0"
    assert change_cell(before, after, "rewards/accuracies", True) == "+47.5 pt ± 5.0"
    assert metric_cell(after, "loss", False) == "1.2500" and change_cell(before, after, "loss", False) == "-0.2500"
    assert metric_cell({"rewards/accuracies": 0.5}, "rewards/accuracies", True) == "50.0%"  # an older summary
    assert change_cell({}, after, "loss", False) == ""
