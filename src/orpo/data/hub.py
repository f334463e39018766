"""Reading datasets from the Hugging Face Hub (beside sources.py): the only code that fetches data over the network.
Models are fetched by transformers' from_pretrained (model/load.py); uploading is after/push.py. A failure of the
Hub (gated, not found, no network, offline with nothing cached) is one line (hub_errors.HubError)."""

from __future__ import annotations

from ..hub_errors import hub_errors


def load_hub_dataset(name: str, config_name: str | None, split: str):
    """A dataset split from the Hub (needs network, or a warm HF cache with HF_HUB_OFFLINE=1)."""
    import datasets

    try:
        with hub_errors(name, "dataset"):
            return datasets.load_dataset(name, config_name, split=split)
    except FileNotFoundError as exc:  # not a Hub failure: e.g. a repo without data files
        raise FileNotFoundError(f"dataset '{name}' is neither a local file/folder nor reachable on the Hub: {exc}") from None
