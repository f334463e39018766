"""`orpo push`: the dry-run folder, the upload call (HfApi patched: no network), the token kept secret."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from conftest import PAIRS, tiny_overrides, write_jsonl
from orpo.after.card import finish_run
from orpo.cli import main
from orpo.config import load_config
from orpo.training.loop import train

TOKEN = "hf_SECRETtokenDoNotLeak123"
ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def tiny_run(chat_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("push")
    data = write_jsonl(tmp / "pairs.jsonl", PAIRS * 4)
    out = tmp / "run"
    train(load_config(None, tiny_overrides(chat_model_dir, data, out, max_steps=2, max_new_tokens=2)), finish=finish_run)
    return out


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_dry_run_writes_the_adapter_card_and_plots(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    dry = tmp_path / "dry"
    assert main(["push", str(tiny_run), "--repo", "me/tiny", "--dry-run", str(dry)]) == 0
    files = {str(p.relative_to(dry)) for p in dry.rglob("*") if p.is_file()}
    assert ADAPTER_FILES <= files and "plots/loss.png" in files
    readme = (dry / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["library_name"] == "peft" and "orpo" in meta["tags"]
    assert "base_model" not in meta  # a local path is not a Hub id
    for part in ("## Held-out evaluation", "preference accuracy", "![loss](plots/loss.png)", "AutoPeftModelForCausalLM", "```yaml"):
        assert part in readme
    assert TOKEN not in capsys.readouterr().out
    assert all(TOKEN.encode() not in (dry / f).read_bytes() for f in files)
    assert main(["push", str(tiny_run), "--repo", "me/tiny", "--dry-run", str(dry)]) == 1  # not empty: refused


def test_upload_gets_the_staged_files_and_never_the_token_in_output(tiny_run, tmp_path, capsys, caplog, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = dict(repo_id=repo_id, token=self.token, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kwargs):
        calls["upload"] = dict(repo_id=repo_id, files={str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()},
                               card=(Path(folder_path) / "README.md").read_text(), **kwargs)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with caplog.at_level(logging.DEBUG):
        assert main(["push", str(tiny_run), "--repo", "me/tiny", "--private"]) == 0
    assert calls["create"]["repo_id"] == "me/tiny" and calls["create"]["private"] is True and calls["create"]["token"] == TOKEN
    assert calls["upload"]["repo_id"] == "me/tiny" and ADAPTER_FILES <= calls["upload"]["files"]
    assert "plots/loss.png" in calls["upload"]["files"] and TOKEN not in calls["upload"]["card"]
    out = capsys.readouterr()
    assert "uploaded" in out.out and TOKEN not in out.out + out.err + caplog.text


def test_push_without_a_token_fails_before_any_upload(tiny_run, monkeypatch, capsys, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved login
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(tiny_run), "--repo", "me/tiny"]) == 1
    assert "no Hugging Face token" in capsys.readouterr().err


def test_push_of_a_merged_model(tiny_run, tmp_path):
    assert main(["merge", str(tiny_run), "--dtype", "bf16", "--out", str(tmp_path / "merged")]) == 0
    dry = tmp_path / "dry"
    assert main(["push", str(tmp_path / "merged"), "--repo", "me/tiny-merged", "--dry-run", str(dry)]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "plots/loss.png"} <= {
        str(p.relative_to(dry)) for p in dry.rglob("*") if p.is_file()}
    assert front_matter((dry / "README.md").read_text())["library_name"] == "transformers"


def test_push_uploads_only_regular_files_inside_the_folder(tiny_run, tmp_path):
    """A link in final/ to a file outside (or to a file inside) is not staged; nothing outside is read."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secrets.json").write_text('{"password": "hunter2"}')
    (run / "final" / "secrets.json").symlink_to(outside / "secrets.json")
    (run / "final" / "vocab.txt").symlink_to(run / "final" / "tokenizer.json")
    dry = tmp_path / "dry"
    assert main(["push", str(run), "--repo", "me/tiny", "--dry-run", str(dry)]) == 0
    staged = {str(p.relative_to(dry)) for p in dry.rglob("*") if p.is_file()}
    assert "secrets.json" not in staged and "vocab.txt" not in staged and ADAPTER_FILES <= staged


def test_a_merged_models_run_dir_cannot_point_elsewhere(tiny_run, tmp_path):
    """orpo_merge.json's run_dir is used only when it is the run the merged model came from: pointed at another
    folder, nothing is read from it and nothing written into it."""
    import json

    merged = tmp_path / "merged"
    assert main(["merge", str(tiny_run), "--dtype", "fp32", "--out", str(merged)]) == 0
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "final").mkdir(parents=True)
    (elsewhere / "config.yaml").write_text("beta: 0.5\n")
    (elsewhere / "metrics.jsonl").write_text((tiny_run / "metrics.jsonl").read_text())
    info = json.loads((merged / "orpo_merge.json").read_text())
    (merged / "orpo_merge.json").write_text(json.dumps({**info, "run_dir": str(elsewhere)}))
    dry = tmp_path / "dry"
    assert main(["push", str(merged), "--repo", "me/m", "--dry-run", str(dry)]) == 0
    assert not (elsewhere / "plots").exists() and not (dry / "plots").exists()


def test_training_and_merging_write_the_push_card(tiny_run, tmp_path):
    """final/README.md after `orpo train` and README.md after `orpo merge` are orpo's card (not peft's empty template
    with a cache path): metadata, the paper cited, framework versions, curves that resolve, loading from the folder;
    the same text `orpo push` stages, but for the title and where it loads from."""
    from orpo.after.card import stage

    readme = (tiny_run / "final" / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation" and "orpo" in meta["tags"]
    assert "More Information Needed" not in readme and "base_model" not in meta  # a local base: no Hub id to give
    for part in ("arXiv:2403.07691", "## Framework versions", "- torch: ", "- orpo: ", "## Held-out evaluation",
                 f'from_pretrained("{(tiny_run / "final").resolve()}")'):
        assert part in readme, part
    for image in [line.split("](")[1].rstrip(")") for line in readme.splitlines() if line.startswith("![")]:
        assert (tiny_run / "final" / image).resolve().is_file(), image
    stage(tiny_run, "me/tiny", tmp_path / "staged")
    pushed = (tmp_path / "staged" / "README.md").read_text()
    assert meta == front_matter(pushed)
    assert main(["merge", str(tiny_run), "--dtype", "bf16", "--out", str(tmp_path / "merged")]) == 0
    merged = (tmp_path / "merged" / "README.md").read_text()
    assert front_matter(merged)["library_name"] == "transformers" and "merged model" in merged


def test_card_metadata_names_hub_base_models_datasets_and_licenses(tmp_path):
    """The builtin base is SmolLM2 on the Hub (Apache 2.0); Hub datasets are listed, local ones described in words;
    `license` overrides; a local base folder's own card gives its license."""
    from orpo.after.card import model_card

    builtin = model_card("me/demo", load_config(None, []), "adapter", {}, [], [])
    meta = front_matter(builtin)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "datasets" not in meta and "generated preference tasks" in builtin
    hub = front_matter(model_card("me/x", load_config(None, ["data.path=mlabonne/orpo-dpo-mix-40k", "license=mit"]), "adapter", {}, [], []))
    assert hub["datasets"] == ["mlabonne/orpo-dpo-mix-40k"] and hub["license"] == "mit"
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "README.md").write_text("---\nlicense: llama3\n---\n# a base\n")
    local = model_card("me/y", load_config(None, [f"model.name_or_path={base}", f"data.path={tmp_path / 'pairs.jsonl'}"]), "full", {}, [], [])
    assert front_matter(local)["license"] == "llama3" and "`pairs.jsonl`" in local
