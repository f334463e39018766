"""The notebooks in examples/ run top to bottom in a real Jupyter kernel (nbclient), offline, with their first
cell's parameters overridden the way papermill does it: a cell injected after the one tagged `parameters`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_notebook(name: str, params: dict, cwd: Path, timeout: int = 1200):
    """Execute examples/NAME with `params` injected; returns the executed notebook (outputs filled in)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    at = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    injected = "# injected by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(injected))
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_notebooks_are_saved_without_outputs():
    """What is committed is code: outputs (images, tracebacks, paths of one machine) are cleared."""
    for path in sorted(EXAMPLES.glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code"), path.name


def test_the_seeds_notebook_runs_with_one_import_changed(tmp_path):
    """The seed's cells in order with `from orpo import ...`: the embedded SmolLM2 in 4-bit on the CPU, a few
    steps, its save, then its merge cell (base reloaded, setup_chat_format, PeftModel, merge_and_unload); the
    merged model's reply ends at <|im_end|>."""
    notebook = run_notebook("orpo-llama3-seed.ipynb", {
        "dataset_name": str(EXAMPLES / "data" / "orpo-mini.jsonl"), "num_samples": 120, "max_steps": 3,
        "output_dir": str(tmp_path / "results"), "new_model": str(tmp_path / "OrpoLlama-3-8B"),
    }, tmp_path)
    imports = [c.source for c in notebook.cells if "import" in c.source]
    assert any("from orpo import ORPOConfig, ORPOTrainer, setup_chat_format" in s for s in imports)
    assert not any(line.startswith(("from trl", "import trl")) for s in imports for line in s.splitlines())
    reply = next(stdout(c) for c in notebook.cells if "print(repr(reply))" in c.source)
    assert reply.strip().endswith("<|im_end|>'"), reply
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["eval_pairs"] == 2
    assert (tmp_path / "OrpoLlama-3-8B" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_the_native_api_notebook_trains_evaluates_and_exports(tmp_path):
    """orpo.train -> run.evaluate() -> run.chat() -> run.export() in a kernel; the run shows itself as its report."""
    small = {"max_steps": 4, "data.builtin_train_size": 32, "data.builtin_eval_size": 8}
    notebook = run_notebook("orpo-python-api.ipynb", {"overrides": small, "output_dir": str(tmp_path / "run"),
                                                      "gguf": str(tmp_path / "run.gguf")}, tmp_path)
    shown = next(c for c in notebook.cells if c.source.rstrip().endswith("run  # shows the before/after table and the training curves"))
    html = "".join(o.get("data", {}).get("text/html", "") for o in shown.outputs)
    assert "preference accuracy" in html and "data:image/png;base64," in html
    assert "True" in stdout(notebook.cells[-1]) and (tmp_path / "run.gguf").is_file()
