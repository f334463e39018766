"""Save and resume training state: trainable weights, optimizer, scheduler, RNG, data position, config.

A checkpoint is written into a temporary folder and renamed to `checkpoint-<step>` only once every file is
on disk (rename is atomic on one filesystem), so an interrupted save never leaves a folder that looks
complete; `resume_from_checkpoint: latest` only considers folders with the final name and a `COMPLETE` file.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import Config, save_config

PREFIX = "checkpoint-"


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done and micro-batches consumed (the data position)."""

    step: int = 0
    micro_batches: int = 0
    tokens: int = 0


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, state: TrainState, config: Config, rank: int = 0) -> Path:
    """Write checkpoint-<step> atomically; returns its path."""
    final = out_dir / f"{PREFIX}{state.step}"
    tmp = out_dir / f".{PREFIX}{state.step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    save_config(config, tmp / "config.yaml")
    (tmp / "COMPLETE").write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in out_dir.glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX) :]
        if path.is_dir() and suffix.isdigit() and (path / "COMPLETE").is_file():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def prune_checkpoints(out_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for path in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(out_dir: Path, spec: str) -> Path:
    """'latest' -> newest complete checkpoint in out_dir; otherwise a checkpoint folder."""
    if spec == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest: no complete checkpoint in {out_dir}")
        return found[-1]
    path = Path(spec)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={spec}: not a complete checkpoint folder")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> TrainState:
    """Restore everything save_checkpoint wrote; returns the loop position."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{path}: checkpoint weights do not match this model (e.g. {unknown[:3]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng-{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return TrainState(**json.loads((path / "trainer_state.json").read_text()))
