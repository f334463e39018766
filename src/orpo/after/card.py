"""The upload folder for `orpo push`: the model files of a run (its adapter) or of a merged model, plus a
model card (README.md with YAML front matter) and the training-curve PNGs of the run's report.

No network here: `stage` writes a folder; push.py uploads it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from ..config import BUILTIN, BUILTIN_HUB_ID, Config, load_config
from ..training.heldout import HELD_OUT_ROWS, change_cell, metric_cell
from ..training.tracking import framework_versions
from .report import PLOTS, read_metrics, write_plots, write_report
from .runs import MERGED_CONFIG, is_run

MODEL_FILES = (".safetensors", ".json", ".jinja", ".model", ".txt", ".tiktoken")  # weights, configs, tokenizer
SKIP = {"orpo_merge.json"}
BUILTIN_LICENSE = "apache-2.0"  # SmolLM2's


def _run_of(folder: Path) -> tuple[Path | None, Path, Config, str]:
    """(run folder or None, folder holding the model files, config, 'adapter'|'merged'|'full')."""
    if is_run(folder):
        final = folder / "final"
        kind = "adapter" if (final / "adapter_config.json").is_file() else "full"
        return folder, final, load_config(folder / "config.yaml"), kind
    if (folder / MERGED_CONFIG).is_file():
        return _merged_from(folder), folder, load_config(folder / MERGED_CONFIG), "merged"
    raise FileNotFoundError(f"{folder} is neither a run folder (config.yaml + final/) nor a merged model (from `orpo merge`)")


def _merged_from(folder: Path) -> Path | None:
    """The run a merged model came from (orpo_merge.json's run_dir), for its curves and results; only when that
    is a real run folder whose config is the one copied into the merged model (anything else is ignored)."""
    info = folder / "orpo_merge.json"
    if not _plain_file(info, folder):
        return None
    try:
        run = Path(str(json.loads(info.read_text())["run_dir"]))
    except (ValueError, KeyError, TypeError):
        return None
    config = run / "config.yaml"
    if run.is_symlink() or not run.is_dir() or not _plain_file(config, run) or not (run / "final").is_dir():
        return None
    return run if config.read_bytes() == (folder / MERGED_CONFIG).read_bytes() else None


def _plain_file(path: Path, inside: Path) -> bool:
    """A regular file (not a link) that lies inside `inside`."""
    return path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(inside.resolve())


def base_model_id(config: Config) -> str:
    return BUILTIN_HUB_ID if config.model.name_or_path == BUILTIN else config.model.name_or_path


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


CITATION = """@article{hong2024orpo,
  title   = {ORPO: Monolithic Preference Optimization without Reference Model},
  author  = {Hong, Jiwoo and Lee, Noah and Thorne, James},
  journal = {arXiv preprint arXiv:2403.07691},
  year    = {2024}
}"""
def base_license(config: Config) -> str | None:
    """config.license, else the base model's license where orpo knows it: the builtin model's (SmolLM2: Apache
    2.0), or the `license:` of a local base folder's own model card."""
    if config.license:
        return config.license
    if config.model.name_or_path == BUILTIN:
        return BUILTIN_LICENSE
    card = Path(config.model.name_or_path).expanduser() / "README.md"
    text = card.read_text(errors="replace") if card.is_file() else ""
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---")[1]) or {}
    except yaml.YAMLError:
        return None
    return str(front["license"]) if isinstance(front, dict) and front.get("license") else None


def data_sources(config: Config) -> tuple[list[str], list[str]]:
    """(Hub dataset names, local data described in words) the run trained on."""
    paths = [config.data.path] if not config.data.mixture else [entry.path for entry in config.data.mixture]
    hub = [p for p in paths if p != BUILTIN and _is_hub_id(p)]
    local = ["orpo's generated preference tasks (`data.path: builtin`)" if p == BUILTIN else f"the local file or folder `{Path(p).name}`"
             for p in paths if p not in hub]
    return hub, local


def model_card(repo: str, config: Config, kind: str, summary: dict, metrics: list[dict], plots: list[str],
               load_from: str | None = None) -> str:
    """README.md: YAML metadata, then what it is, results, curves, how to load it (from `load_from`, default
    `repo`), the versions, the citation, the config."""
    base = base_model_id(config)
    meta: dict = {"library_name": "peft" if kind == "adapter" else "transformers", "pipeline_tag": "text-generation",
                  "tags": ["orpo", "preference-optimization"] + (["lora"] if kind == "adapter" else [])}
    if _is_hub_id(base):
        meta["base_model"] = base
    hub_data, local_data = data_sources(config)
    if hub_data:
        meta["datasets"] = hub_data
    if base_license(config):
        meta["license"] = base_license(config)
    data = ", ".join([f"`{d}`" for d in hub_data] + local_data)
    what = {"adapter": "a LoRA adapter", "merged": "a merged model (LoRA folded into the base weights)", "full": "a fully fine-tuned model"}[kind]
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {repo.split('/')[-1]}", "",
        f"{what[0].upper() + what[1:]} trained with ORPO (Odds Ratio Preference Optimization, Hong, Lee & Thorne 2024) "
        f"with orpo, on top of `{base}`.", "",
        f"- **Base model:** `{base}`", f"- **Data:** {data}",
        f"- **Training:** {summary.get('steps', '?')} steps, {summary.get('data', {}).get('train_pairs', '?')} pairs, "
        f"learning rate {config.learning_rate}, beta (lambda) {config.beta}, "
        + (f"LoRA r={config.lora.r}, alpha={config.lora.alpha}" if config.lora.enabled else "full fine-tuning")
        + (", QLoRA (4-bit base)" if config.model.load_in_4bit else ""), "",
    ]
    before, after = summary.get("before", {}), summary.get("after", {})
    if after:
        lines += ["## Held-out evaluation", "", f"{summary.get('data', {}).get('eval_pairs', '?')} held-out pairs.", "",
                  "| metric | before | after | change |", "| --- | --- | --- | --- |"]
        for label, key, pct in HELD_OUT_ROWS:
            if key in after:
                lines.append(f"| {label} | {metric_cell(before, key, pct)} | {metric_cell(after, key, pct)} | {change_cell(before, after, key, pct)} |")
        if "rewards/accuracies_se" in after:
            lines.append("\n± one binomial standard error of the share (for a change, the two combined).")
        lines.append("")
    train_lines = [m for m in metrics if "loss" in m]
    if train_lines:
        last = train_lines[-1]
        keys = ["loss", "nll_loss", "log_odds_ratio", "rewards/margins", "rewards/accuracies"]
        lines += ["## Final training metrics", "", f"At step {last['step']}:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {last[k]:.4f} |" for k in keys if isinstance(last.get(k), float)] + [""]
    if plots:
        lines += ["## Training curves", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    source = load_from or repo
    versions = summary.get("versions") or framework_versions()  # those it was trained with, where the run recorded them
    lines += ["## How to load", "", "```python"]
    if kind == "adapter":
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{source}")  # loads the base model too',
                  f'tokenizer = AutoTokenizer.from_pretrained("{source}")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{source}")', f'tokenizer = AutoTokenizer.from_pretrained("{source}")']
    lines += ['messages = [{"role": "user", "content": "What is 12 + 7?"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', return_dict=True)",
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))", "```", "",
              "The chat template is saved with the tokenizer; generation stops at its end-of-turn token.", "",
              "## Framework versions", ""] + [f"- {name}: {v}" for name, v in versions.items()] + [
              "", "## Citation", "", "ORPO (Hong, Lee & Thorne 2024, arXiv:2403.07691):", "", "```bibtex", CITATION, "```", "",
              "## Training config", "", "<details><summary>config.yaml</summary>", "", "```yaml",
              yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False).strip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def write_card(folder: str | Path) -> Path:
    """Write the card `orpo push` writes into a model folder on disk: a run's final/ (the end of `orpo train`) or a
    merged model (the end of `orpo merge`), named after the run and loading from the folder. Replaces peft's
    empty template. Returns the README path."""
    folder = Path(folder)
    run, model_dir, config, kind = _run_of(folder.parent if folder.name == "final" else folder)
    summary, metrics = _results(run)
    where = Path(os.path.relpath(run / "plots", model_dir)).as_posix() if run else ""
    plots = [f"{where}/{stem}.png" for stem, *_ in PLOTS if run and (run / "plots" / f"{stem}.png").is_file()]  # report order
    name = (run or model_dir).name
    path = model_dir / "README.md"
    path.write_text(model_card(name, config, kind, summary, metrics, plots, load_from=str(model_dir.resolve())))
    return path


def finish_run(run_dir: Path) -> None:
    """What this stage adds to a finished `orpo train` run (its main process, once final/ and summary.json are
    written; training.loop.train calls it as `finish`): report.html with plots/, then final/README.md."""
    write_report(run_dir)  # report.html + plots/*.png from metrics.jsonl and summary.json
    write_card(run_dir / "final")  # final/README.md: the model card `orpo push` uploads


def _results(run: Path | None) -> tuple[dict, list[dict]]:
    """A run's summary (without generation samples) and metrics lines; empty without a run."""
    summary = json.loads((run / "summary.json").read_text()) if run and _plain_file(run / "summary.json", run) else {}
    for key in ("before", "after"):
        summary.get(key, {}).pop("samples", None)
    return summary, read_metrics(run) if run and _plain_file(run / "metrics.jsonl", run) else []


def stage(folder: str | Path, repo: str, out: str | Path) -> list[Path]:
    """Write into `out` exactly what `orpo push` uploads; returns the files (relative to `out`)."""
    folder, out = Path(folder), Path(out)
    run, model_dir, config, kind = _run_of(folder)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(model_dir.iterdir()):  # regular files inside the folder only: links are never followed
        if _plain_file(path, model_dir) and path.suffix in MODEL_FILES and path.name not in SKIP:
            shutil.copy(path, out / path.name)
    if kind == "adapter":  # the adapter points at the base it was trained on: make that a Hub id where we know it
        adapter = json.loads((out / "adapter_config.json").read_text())
        if config.model.name_or_path == BUILTIN:
            adapter["base_model_name_or_path"] = BUILTIN_HUB_ID
            (out / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    summary, metrics = _results(run)
    plots = []
    if metrics:  # drawn straight into the upload folder: nothing is written into the run
        plots = [f"plots/{stem}.png" for stem in write_plots(run, out / "plots", metrics)]
    (out / "README.md").write_text(model_card(repo, config, kind, summary, metrics, plots))
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
