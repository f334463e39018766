"""Metrics sinks: metrics.jsonl always, Accelerate trackers (tensorboard/wandb/mlflow) when asked."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLog:
    """One JSON line per log event: {"step", "time", metric: value, ...}; non-finite values become null."""

    def __init__(self, path: Path, accelerator=None, enabled: bool = True):
        self.enabled = enabled
        self.accelerator = accelerator
        self.file = path.open("a") if enabled else None

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in values.items()}
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self.file.flush()
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in clean.items() if v is not None}, step=step)

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
