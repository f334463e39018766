"""Save and resume training state: trainable weights, optimizer, scheduler, RNG, data position, config.

A checkpoint is written into a temporary folder and renamed to `checkpoint-<step>` only once every file is
on disk (rename is atomic on one filesystem), so an interrupted save never leaves a folder that looks
complete; `resume_from_checkpoint: latest` only considers folders with the final name and a `COMPLETE` file.

Nothing in a checkpoint can run code when it is loaded: weights are safetensors, the loop position JSON, and the
optimizer, scheduler and RNG states hold only tensors and plain values (numpy's RNG state is stored as a
tensor), read back with `torch.load(weights_only=True)`; a file holding anything else is refused.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import Config, ConfigError, save_config
from ..files import atomic_folder
from .tracking import flat_params

# Keys a resumed run may change: they decide what is logged, evaluated, saved or how fast, not what is learned.
# Everything else (data, model, tokenization, optimisation) must equal the checkpoint's; max_steps may grow.
RESUME_MAY_CHANGE = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "eval_steps", "eval_on_start",
    "save_steps", "save_total_limit", "report_to", "per_device_eval_batch_size", "max_new_tokens", "on_nonfinite",
    "gradient_checkpointing", "layout", "max_tokens_per_batch", "logps_chunk_size", "license",
}

PREFIX = "checkpoint-"


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done and micro-batches consumed (the data position)."""

    step: int = 0
    micro_batches: int = 0
    tokens: int = 0
    skipped_steps: int = 0  # steps with a non-finite loss or gradient, not applied (on_nonfinite=skip)


@dataclass
class Procs:
    """The processes of a run, as checkpoints see them: this one's rank, how many, whether weights are sharded
    over them, and a barrier every process calls."""

    rank: int = 0
    world: int = 1
    sharded: bool = False
    barrier: Callable[[], None] = lambda: None
    # An engine that writes its own weights and optimizer state (DeepSpeed, through Accelerate's save_state /
    # load_state; every process calls them). Its files are its own format, not only tensors.
    save_state: Callable[[Path], None] | None = None
    load_state: Callable[[Path], None] | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


class NonFiniteError(ValueError):
    """A non-finite loss, gradient or weight: training stops, nothing non-finite is saved."""


def check_finite(model, what: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse to save `what` if any trainable weight is NaN or inf: the model's own (this process's shards of them
    when sharded), or those of `state` (weights gathered from shards) when given."""
    if state is not None:
        bad = [n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    else:
        bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(_local(p)).all())]
    if bad:
        raise NonFiniteError(f"not saving {what}: {len(bad)} trained tensors hold NaN/inf (e.g. {bad[0]})")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable tensors (this process's shards of them when sharded), on the CPU."""
    return {n: _local(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, state: TrainState, config: Config, procs: Procs | None = None) -> Path:
    """Write checkpoint-<step> atomically; returns its path. Every process calls it: each writes its RNG state,
    and with sharded weights its shards of the trained weights and optimizer state; the main process the rest."""
    procs = procs or Procs()
    final = out_dir / f"{PREFIX}{state.step}"
    if procs.save_state is None and (procs.sharded or procs.main):  # each its own shards, or the main its copy
        check_finite(model, final.name)
    with atomic_folder(final, procs.main, procs.barrier) as tmp:
        torch.save(_rng_state(), tmp / f"rng-{procs.rank}.pt")
        if procs.save_state is not None:
            procs.save_state(tmp / "engine")
        elif procs.sharded:
            from .engine import local_optimizer_state

            save_file(trainable_state(model), str(tmp / f"trainable-{procs.rank}.safetensors"))
            torch.save(local_optimizer_state(optimizer), tmp / f"optimizer-{procs.rank}.pt")
        elif procs.main:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if procs.main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({**asdict(state), "processes": procs.world}, indent=2))
            save_config(config, tmp / "config.yaml")
    return final


# What orpo writes into an output_dir (overwrite_output_dir removes these, and nothing else).
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "eval_before.json", "report.html", "plots", "final", "orpo")


def check_output_dir(out: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse, before any work, an output_dir that is a file or lies under one, or one that already holds files
    when the run neither resumes nor may overwrite. Writes nothing."""
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"output_dir {out} cannot be used: {parent} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not resuming and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"output_dir {out} is not empty ({shown}): resume its run (resume_from_checkpoint=latest), "
                         "choose another output_dir, or set overwrite_output_dir=true to replace it")


def prepare_output_dir(out: Path, overwrite: bool, resuming: bool) -> None:
    """Create output_dir, writable (one clear line if not), after check_output_dir. With `overwrite` a previous
    run's files go (only those: RUN_FILES, checkpoints); a resumed run keeps its files."""
    check_output_dir(out, overwrite, resuming)
    if overwrite and not resuming and out.is_dir():
        for path in out.iterdir():
            if path.name in RUN_FILES or path.name.startswith((PREFIX, f".{PREFIX}", ".final")):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    for stale in out.glob(".*.partial") if out.is_dir() else []:  # debris of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".orpo-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output_dir {out} cannot be written: {exc.strerror or exc}") from None


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


def check_resume_config(saved: Config, now: Config, path: Path, step: int) -> None:
    """Refuse to resume `path` (at `step`) with settings that change what is learned, naming each difference."""
    old, new = flat_params(saved.model_dump(mode="json")), flat_params(now.model_dump(mode="json"))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key in RESUME_MAY_CHANGE:
            continue
        if key == "max_steps" and now.max_steps > step:  # an explicit extension (or a shorter run not yet reached)
            continue
        diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    if diffs:
        raise ConfigError(f"resume from {path}: settings differ from the checkpoint's ({'; '.join(diffs)}). Resume with the "
                          "checkpoint's values (its config.yaml), or start a new run in another output_dir")


def load_plain(path: Path):
    """A torch.save file holding only tensors and plain Python values; anything else (which unpickling would have
    to construct, possibly running code) is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: holds objects other than tensors and plain values; refusing to load it "
                         "(unpickling them could run code). Was this checkpoint written by orpo?") from exc


def copy_weights(model, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Saved tensors into the model's parameters of the same names (into this process's shards when sharded)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{path}: checkpoint weights do not match this model (e.g. {unknown[:3]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            target = _local(params[name])
            target.copy_(tensor.to(target.device, target.dtype))


def load_checkpoint(path: Path, model, optimizer, scheduler, procs: Procs | None = None) -> TrainState:
    """Restore everything save_checkpoint wrote; returns the loop position. Sharded weights and optimizer state
    come back only into as many processes as wrote them."""
    procs = procs or Procs()
    saved = json.loads((path / "trainer_state.json").read_text())
    written_by = saved.pop("processes", 1)
    if (path / "engine").is_dir() or procs.load_state is not None:
        if not ((path / "engine").is_dir() and procs.load_state is not None):
            raise ConfigError(f"{path}: a DeepSpeed checkpoint resumes only under DeepSpeed, and a DeepSpeed run only from one")
        procs.load_state(path / "engine")
        scheduler.load_state_dict(load_plain(path / "scheduler.pt"))
        _set_rng_state(load_plain(path / f"rng-{procs.rank}.pt"))
        return TrainState(**saved)
    sharded = (path / "trainable-0.safetensors").is_file()
    if sharded and (not procs.sharded or written_by != procs.world):
        raise ConfigError(f"{path} holds weights sharded over {written_by} processes: resume it with the same engine "
                          f"(FSDP2 / ZeRO-3) and {written_by} processes (this run: {procs.world})")
    if not sharded and procs.sharded:
        raise ConfigError(f"{path} was written without sharding: resume it without FSDP2 / ZeRO-3 (DDP or one process)")
    if sharded:
        from .engine import load_local_optimizer

        copy_weights(model, load_file(str(path / f"trainable-{procs.rank}.safetensors")), path)
        load_local_optimizer(optimizer, load_plain(path / f"optimizer-{procs.rank}.pt"))
    else:
        copy_weights(model, load_file(str(path / "trainable.safetensors")), path)
        optimizer.load_state_dict(load_plain(path / "optimizer.pt"))
    scheduler.load_state_dict(load_plain(path / "scheduler.pt"))
    rng = path / f"rng-{procs.rank}.pt"
    if rng.is_file():
        _set_rng_state(load_plain(rng))
    return TrainState(**saved)
