"""Reading datasets from the Hugging Face Hub (beside sources.py): the only code that fetches data over the network.
Models are fetched by transformers' from_pretrained (model/load.py); uploading is after/push.py."""

from __future__ import annotations


def load_hub_dataset(name: str, config_name: str | None, split: str):
    """A dataset split from the Hub (needs network, or a warm HF cache with HF_HUB_OFFLINE=1)."""
    import datasets

    try:
        return datasets.load_dataset(name, config_name, split=split)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"dataset '{name}' is neither a local file/folder nor reachable on the Hub: {exc}") from None
