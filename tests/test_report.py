"""report.html and plots: written by train, rebuilt by `orpo report`, self-contained."""

from __future__ import annotations

import base64
import json
import re

from conftest import tiny_overrides
from orpo.cli import main
from orpo.report import PLOTS, write_report


def test_train_writes_the_report_and_orpo_report_rebuilds_it(chat_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(chat_model_dir, pairs_file, out, eval_steps=2, max_new_tokens=4)]) == 0
    page = (out / "report.html").read_text()
    assert {p.stem for p in (out / "plots").glob("*.png")} == {stem for stem, _, _ in PLOTS}
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == len(PLOTS) and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "src='http" not in page and "<script" not in page  # self-contained, nothing fetched
    assert "preference accuracy" in page and "before" in page
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
