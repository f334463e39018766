"""`orpo compare`: the config keys that differ (exactly those), held-out metrics with standard errors, and the
overlaid curves, in a page a real browser renders."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import PAIRS, tiny_overrides, write_jsonl
from orpo.after.compare import CURVES, differing_keys, load_run
from orpo.cli import main
from test_report import PROBE


@pytest.fixture(scope="module")
def sweep(chat_model_dir, tmp_path_factory):
    """Three tiny runs: a baseline, beta=0.5, and beta=0.5 with lora.r=2."""
    root = tmp_path_factory.mktemp("sweep")
    data = write_jsonl(root / "pairs.jsonl", PAIRS * 4)
    runs = []
    for name, extra in (("base", {}), ("b05", {"beta": 0.5}), ("b05-r2", {"beta": 0.5, "lora.r": 2})):
        out = root / name
        assert main(["train", *tiny_overrides(chat_model_dir, data, out, eval_steps=2, max_new_tokens=4, max_steps=4, **extra)]) == 0
        runs.append(out)
    return runs


def test_compare_lists_exactly_the_keys_that_differ(sweep, tmp_path, capsys):
    page = tmp_path / "compare.html"
    assert main(["compare", *map(str, sweep), "--out", str(page)]) == 0
    printed = capsys.readouterr().out
    assert differing_keys([load_run(str(r)) for r in sweep]) == ["beta", "lora.r"]
    assert differing_keys([load_run(str(r)) for r in sweep[:2]]) == ["beta"]
    html = page.read_text()
    config_table = html.split("<h2>Config keys that differ</h2>")[1].split("<h2>")[0]
    assert re.findall(r"<tr><td>([^<]+)</td>", config_table) == ["beta", "lora.r"]
    assert "<td>0.1</td><td>0.5</td><td>0.5</td>" in config_table and "<td>4</td><td>4</td><td>2</td>" in config_table
    summary = json.loads((sweep[1] / "summary.json").read_text())
    after = summary["after"]
    shown = f"{100 * after['rewards/accuracies']:.1f}% ± {100 * after['rewards/accuracies_se']:.1f}"
    assert shown in html and shown in printed
    assert "src='http" not in html and "<script" not in html  # self-contained
    assert printed.splitlines()[0].split()[:2] == ["config", "key"]


def test_compare_renders_in_headless_chromium(chromium, sweep, tmp_path):
    """Every overlaid plot decodes and is laid out visible, one per curve. No browser: skipped here, failed under CI
    (conftest.chromium)."""
    page = tmp_path / "compare.html"
    assert main(["compare", *map(str, sweep), "--out", str(page)]) == 0
    page.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    shown = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                            "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", shown.stdout, re.S)
    assert found, shown.stderr[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert [i["alt"] for i in images] == [title for title, _, _ in CURVES]
    for image in images:
        assert image["complete"] and image["natural"] > 0 and image["width"] > 100 and image["height"] > 50 and image["shown"], image


def test_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"skipped {tmp_path}: not a run folder (no config.yaml)",
                   "orpo: error: no run folder among the 1 given (a run folder holds config.yaml, as orpo train's output_dir)"]


def test_what_is_not_a_run_is_skipped_with_its_reason(sweep, tmp_path, capsys):
    """`orpo compare runs/*` beside a merged model, a model folder, a file and an empty folder: each skipped with
    one line saying what it is, the runs compared; with none left, one error line."""
    merged, model, empty = tmp_path / "orpo-merged", tmp_path / "model", tmp_path / "empty"
    for folder in (merged, model, empty):
        folder.mkdir()
    (merged / "orpo_config.yaml").write_text("beta: 0.1\n")
    (merged / "config.json").write_text("{}")
    (model / "config.json").write_text("{}")
    note = tmp_path / "notes.txt"
    note.write_text("a file")
    page = tmp_path / "compare.html"
    others = [merged, model, note, empty]
    assert main(["compare", str(sweep[0]), *map(str, others), str(sweep[1]), "--out", str(page)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"skipped {merged}: a merged model (orpo merge's output), not a run folder",
        f"skipped {model}: a model folder, not a run folder",
        f"skipped {note}: a file, not a run folder",
        f"skipped {empty}: not a run folder (no config.yaml)",
    ]
    assert "orpo compare: 2 runs" in page.read_text() and captured.out.splitlines()[1].split() == ["beta", "0.1", "0.5"]
    assert main(["compare", str(model), str(merged), "--out", str(page)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[2].startswith("orpo: error: no run folder among the 2 given")
