"""The search space of `orpo sweep`: config keys and the values each may take, from the command line or a YAML file.

    beta=[0.05,0.1,0.25,0.5]          one of these values (a grid when every key is a list)
    learning_rate=log(1e-5,1e-3)      log-uniform between the bounds
    lora.dropout=uniform(0,0.1)       uniform between the bounds
    num_train_epochs=int(1,3)         an integer from the first bound to the second, both included

A YAML file maps the same keys to a list or to one of these strings ({beta: [0.1, 0.5], learning_rate:
"log(1e-5,1e-3)"}). Every key is checked against the config before a trial runs: a key the config does not have,
a value it refuses (each listed value and both bounds are tried), an empty list or range, a key that is also fixed
on the command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import Config, ConfigError, make_config, parse_overrides, read_yaml

RANGE = re.compile(r"^(log|uniform|int)\((.*)\)$")
OWN_KEYS = ("output_dir", "overwrite_output_dir", "data.validation_size")  # set by the sweep itself


@dataclass(frozen=True)
class Dim:
    """One searched key: a list of values, or a range (log-uniform, uniform, integers)."""

    key: str
    kind: Literal["choice", "log", "uniform", "int"]
    values: tuple = ()  # choice
    low: float = 0.0  # ranges
    high: float = 0.0

    def describe(self) -> str:
        """As the user writes it: '[0.1, 0.5]', 'log(1e-05,0.001)'."""
        if self.kind == "choice":
            return "[" + ", ".join(map(str, self.values)) + "]"
        return f"{self.kind}({self.low:g},{self.high:g})"

    def corners(self) -> list[Any]:
        """The values to validate against the config: every listed value, or both bounds."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        """This key's value for an Optuna trial."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")


def parse_dim(key: str, value: Any) -> Dim:
    """One key's space from a YAML value: a list, or 'log(lo,hi)' / 'uniform(lo,hi)' / 'int(lo,hi)'."""
    where = f"search space {key}"
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: the list is empty; give at least one value, e.g. {key}=[0.1,0.5]")
        odd = [v for v in value if not isinstance(v, (str, int, float, bool)) and v is not None]
        if odd:
            raise ConfigError(f"{where}: list values must be numbers, strings, true/false or null, got {odd[0]!r}")
        return Dim(key, "choice", tuple(value))
    found = RANGE.match(str(value).replace(" ", ""))
    bounds = found.group(2).split(",") if found else []
    if not found or len(bounds) != 2:
        raise ConfigError(f"{where}: {value!r} is not a list [a,b,...] or a range log(lo,hi), uniform(lo,hi), int(lo,hi)")
    kind = found.group(1)
    try:
        low, high = (int(b) if kind == "int" else float(b) for b in bounds)
    except ValueError:
        raise ConfigError(f"{where}: bounds of {value!r} are not {'integers' if kind == 'int' else 'numbers'}") from None
    if low >= high:
        raise ConfigError(f"{where}: the range {value} is empty (its low bound must be below its high bound)")
    if kind == "log" and low <= 0:
        raise ConfigError(f"{where}: log({low:g},{high:g}) needs bounds above 0")
    return Dim(key, kind, low=low, high=high)


def parse_space(items: list[str] | dict[str, Any]) -> dict[str, Dim]:
    """{key: Dim} from `key=spec` items and YAML files (an item without '='), or from a {key: spec} mapping."""
    found: dict[str, Dim] = {}

    def add(key: str, value: Any) -> None:
        if key in found:
            raise ConfigError(f"search space {key}: given twice")
        found[key] = parse_dim(key, value)

    if isinstance(items, dict):
        for key, value in items.items():
            add(str(key), value)
    else:
        for item in items:
            if "=" in item:
                for key, value in parse_overrides([item]).items():
                    add(key, value)
                continue
            if not Path(item).is_file():
                raise ConfigError(f"search space {item!r}: not key=spec and no such YAML file")
            tree = read_yaml(item)
            for key, value in tree.items():
                add(str(key), value)
    if not found:
        raise ConfigError("the search space is empty: give --search KEY=SPEC (e.g. beta=[0.1,0.5]) or a YAML file")
    return found


def is_grid(space: dict[str, Dim]) -> bool:
    """True when every key is a list: the sweep then walks the grid of their combinations."""
    return all(d.kind == "choice" for d in space.values())


def grid_size(space: dict[str, Dim]) -> int:
    size = 1
    for dim in space.values():
        size *= len(dim.values)
    return size


def config_value(config: Config, key: str) -> Any:
    """The value of a dotted key in a config ('lora.r' -> config.lora.r)."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_space(space: dict[str, Dim], base: Config, fixed: dict[str, Any]) -> dict[str, Dim]:
    """Raise ConfigError, one line, for a key the sweep sets itself or that is also fixed on the command line,
    and for a key or value the config refuses (every listed value and both bounds of a range are tried). Returns
    the space with listed values as the config reads them (YAML reads 1e-2 as a string; learning_rate is 0.01)."""
    checked = {}
    for key, dim in space.items():
        if key in OWN_KEYS:
            raise ConfigError(f"search space {key}: set by the sweep itself (one folder per trial, its validation split); it cannot be searched")
        if key in fixed:
            raise ConfigError(f"{key} is both searched ({dim.describe()}) and fixed on the line ({key}={fixed[key]}): drop one")
        read = []
        for value in dim.corners():
            try:
                read.append(config_value(make_config(base, {key: value}), key))
            except ConfigError as exc:
                raise ConfigError(f"search space {key}={value!r}: {str(exc).strip()}") from None
        checked[key] = Dim(key, "choice", tuple(read)) if dim.kind == "choice" else dim
    return checked
