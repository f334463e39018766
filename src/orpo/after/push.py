"""Uploading to the Hugging Face Hub (beside card.py, which stages what goes up): `orpo push`. The only code that
sends anything over the network; reading datasets is data/hub.py."""

from __future__ import annotations

from pathlib import Path

from ..hub_errors import hub_errors


def hub_token() -> str:
    """The Hugging Face token from HF_TOKEN or the saved login. Kept in memory only: never printed or written."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PermissionError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def push_folder(folder: Path, repo: str, private: bool) -> str:
    """Create `repo` (a model repository) if needed and upload every file of `folder` in one commit; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=hub_token())
    with hub_errors(repo, upload=True):  # a bad token (401), no write access (403), no network: one line
        url = api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message="Upload ORPO model (orpo push)")
    return str(url)


def push_run(folder: str, repo: str, private: bool = False, dry_run: str | None = None) -> tuple[str | None, list[Path]]:
    """Stage the model files + model card + plots and upload them: (the repository's URL, the files). With
    `dry_run` (a folder) the staged files are written there and nothing is uploaded (URL None)."""
    import tempfile

    from .card import stage

    if dry_run is not None:
        return None, stage(folder, repo, dry_run)
    hub_token()  # fail before staging when there is no token
    with tempfile.TemporaryDirectory(prefix="orpo-push-") as tmp:
        files = stage(folder, repo, tmp)
        return push_folder(Path(tmp), repo, private), files
