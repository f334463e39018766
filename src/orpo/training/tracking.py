"""Metrics sinks: metrics.jsonl always, Accelerate trackers (tensorboard/wandb/mlflow) when asked."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

from ..config import Config, ConfigError

PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_trackers(config: Config) -> None:
    """Every tracker in report_to is importable, else a config error (before any work is done)."""
    for name in config.report_to:
        if not any(importlib.util.find_spec(module) for module in PACKAGES[name]):
            package = PACKAGES[name][0]
            raise ConfigError(f"report_to={name}: the {package} package is not installed (pip install {package}, or pip install 'orpo[trackers]')")


def finite_json(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, so it dumps as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def strict_json(value) -> str:
    """Strict JSON (no NaN/Infinity tokens: non-finite floats become null), indented."""
    return json.dumps(finite_json(value), indent=2, allow_nan=False)


def dump_json(value, path: Path) -> None:
    path.write_text(strict_json(value))


FRAMEWORKS = ("orpo", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes")


def framework_versions() -> dict[str, str]:
    """Installed versions of orpo and the libraries it trains with (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in FRAMEWORKS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _step(line: str) -> int | None:
    """The step of a metrics line; None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """One JSON line per log event: {"step", "time", metric: value, ...}; non-finite values become null."""

    def __init__(self, path: Path, accelerator=None, enabled: bool = True, resume_step: int | None = None):
        """`resume_step`: the run resumes from that step's checkpoint; lines logged after it (by the run that
        stopped) are dropped, so the resumed run does not log those steps twice."""
        self.enabled = enabled
        self.accelerator = accelerator
        if enabled and resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if (step := _step(line)) is not None and step <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self.file = path.open("a") if enabled else None
        self.listeners: list = []  # callables(step, values) told of every line (ORPOTrainer's log_history, callbacks)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: finite_json(v) if isinstance(v, (int, float)) else None for k, v in values.items()}
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}, allow_nan=False) + "\n")
        self.file.flush()
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in clean.items() if v is not None}, step=step)
        for listener in self.listeners:
            listener(step, clean)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def flat_params(tree: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """Nested config -> {"a.b": scalar}: trackers' hyper-parameter tables take scalars only."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat
