"""Files, Hub datasets and mixtures -> canonical pair rows, with every dropped row counted.

`build_rows(data_cfg)` reads each source (`data.path`, or each `data.mixture` entry), turns every row into the
canonical pair (formats.canonical), applies the entry's score filters and sample size, concatenates, shuffles
with `data.shuffle_seed` and holds out `data.test_size`. Deterministic for a seed.

A canonical row: `id` ("<source>:<row number>", 1-based like every row number orpo shows, or the source's own `id`), `source`, `prompt`, `chosen`,
`rejected` (message lists), `score_chosen`, `score_rejected` (float or None), `max_tokens` (the entry's
max_length filter, -1 for none).

Bad rows (malformed JSON, wrong types, missing columns, unknown roles) raise a DataError naming file, line and
field; with `data.on_bad_rows: skip` they are counted and sampled in the report instead.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import MEMORY, DataConfig, MixtureEntry
from .formats import DataError, canonical, detect_format, rename

_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SAMPLES = 5  # example row ids / messages kept per drop reason
TEMPLATED = {"conversations": "chosen and rejected are whole conversations", "prompt": "the prompt ends with the assistant header"}
log = logging.getLogger(__name__)


@dataclass
class DataReport:
    """Counts of what the pipeline read, kept and dropped (with example row ids), for the log and summary.json."""

    train_rows: int = 0
    eval_rows: int = 0
    read: dict[str, int] = field(default_factory=dict)  # rows read per source
    dropped: dict[str, int] = field(default_factory=dict)  # "<stage>/<reason>" -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # "<stage>/<reason>" -> a few row ids
    bad_rows: list[str] = field(default_factory=list)  # messages of the first skipped bad rows
    formats: dict[str, str] = field(default_factory=dict)  # detected (or forced) format per source
    findings: list[dict[str, Any]] = field(default_factory=list)  # the data doctor's warnings (doctor.py)

    def drop(self, key: str, row_id: str, count: int = 1) -> None:
        self.dropped[key] = self.dropped.get(key, 0) + count
        ids = self.examples.setdefault(key, [])
        if len(ids) < _SAMPLES:
            ids.append(row_id)

    def as_dict(self) -> dict[str, Any]:
        out = {"train_pairs": self.train_rows, "eval_pairs": self.eval_rows, "dropped": dict(self.dropped)}
        out.update(read=dict(self.read), drop_examples={k: list(v) for k, v in self.examples.items()})
        if self.bad_rows:
            out["bad_rows"] = list(self.bad_rows)
        if self.findings:
            out["findings"] = list(self.findings)
        return out


# Drop reasons (data report keys `<stage>/<reason>`) in words.
REASONS = {
    "bad_row": "unreadable rows", "no_score": "no score to filter on", "below_min_score": "below data.min_score",
    "tie": "chosen and rejected scored alike", "empty_response": "an empty response", "identical_responses":
    "chosen identical to rejected", "too_long": "longer than max_length",
}


def dropped_words(dropped: dict[str, int]) -> str:
    """{'train/too_long': 3, 'read/tie': 1} -> '1 rows read: chosen and rejected scored alike; 3 training pairs:
    longer than max_length' (the log line, the report's header)."""
    if not dropped:
        return "none"
    stage = {"read": "rows read", "train": "training pairs", "eval": "held-out pairs"}
    parts = []
    for key, count in sorted(dropped.items()):
        where, _, reason = key.partition("/")
        parts.append(f"{count} {stage.get(where, where)}: {REASONS.get(reason, reason.replace('_', ' '))}")
    return "; ".join(parts)


class BadRows:
    """on_bad_rows policy: raise the DataError, or count it (reason 'read/bad_row') and keep a sample."""

    def __init__(self, policy: str, report: DataReport):
        self.policy, self.report = policy, report

    def __call__(self, error: DataError, row_id: str) -> None:
        if self.policy == "error":
            raise error
        self.report.drop("read/bad_row", row_id)
        if len(self.report.bad_rows) < _SAMPLES:
            self.report.bad_rows.append(str(error)[:300])


# ---------------------------------------------------------------- reading


def _kind(local: Path) -> str | None:
    suffixes = [s.lower() for s in local.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    return _FILE_KINDS.get("".join(suffixes[-1:]))


def _reason(exc: BaseException) -> str:
    """The innermost cause of a reader's error on one line (datasets wraps the parser's own message, e.g. pandas'
    'EOF inside string starting at row 3' for a quote that is never closed)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(exc).split())[:300]
    if "EOF inside string" in text:
        text = f"a quoted field is never closed ({text})"
    return text


def _read_folder(local: Path):
    """Every data file directly in a folder, in name order, as one dataset; refused when the folder holds none,
    or files of several kinds (which parse into different columns)."""
    import datasets

    files = sorted(p for p in local.iterdir() if p.is_file() and _kind(p) is not None)
    if not files:
        raise DataError(f"{local}: no data files in this folder (expected {', '.join(sorted(_FILE_KINDS))}, optionally .gz)")
    kinds = sorted({_kind(p) for p in files})
    if len(kinds) > 1:
        listing = "; ".join(f"{kind}: {', '.join(p.name for p in files if _kind(p) == kind)}" for kind in kinds)
        raise DataError(f"{local}: holds data files of several kinds ({listing}); keep one kind per folder, or list the "
                        "files as data.mixture entries")
    empty = [p.name for p in files if p.stat().st_size == 0]
    if empty:
        raise DataError(f"{local}: empty data file(s): {', '.join(empty)}")
    try:
        return datasets.load_dataset(kinds[0], data_files=[str(p) for p in files], split="train")
    except Exception as exc:  # datasets wraps parser errors in several types
        raise DataError(f"{local}: could not be read as {kinds[0]}: {_reason(exc)}") from None


def read_rows(path: str, name: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a local file/folder or a Hub dataset name."""
    import datasets

    local = Path(path).expanduser()
    if local.is_file():
        kind = _kind(local)
        if kind is None:
            raise DataError(f"{local}: unsupported file type; use one of {', '.join(sorted(_FILE_KINDS))} (optionally .gz)")
        if local.stat().st_size == 0:
            raise DataError(f"{local}: the file is empty")
        try:
            return datasets.load_dataset(kind, data_files=str(local), split="train")
        except Exception as exc:  # datasets wraps parser errors in several types
            raise DataError(f"{local}: could not be read as {kind}: {_reason(exc)}") from None
    if local.is_dir():
        if (local / "dataset_info.json").exists() or (local / "state.json").exists():
            with quiet_datasets():
                loaded = datasets.load_from_disk(str(local))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return _read_folder(local)
    if path.startswith((".", "/", "~")) or path.endswith(tuple(_FILE_KINDS)) or path.endswith(".gz"):
        raise DataError(f"data file not found: {path}")
    from .hub import load_hub_dataset

    return load_hub_dataset(path, name, split)


@contextmanager
def quiet_datasets():
    """datasets' own bars (saving and loading Arrow files) off unless -v; orpo's (tokenizing, dropping) stay."""
    import datasets
    from datasets.utils.tqdm import are_progress_bars_disabled

    if logging.getLogger("orpo").isEnabledFor(logging.DEBUG) or are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def _json_records(local: Path):
    """(row id, where, value) from a .jsonl/.json(.gz) file, parsed here so errors name the line (a line that is
    not JSON gives its DataError as the value)."""
    opener = gzip.open if local.suffix.lower() == ".gz" else open
    try:
        with opener(local, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{local}: could not be read as UTF-8 text: {exc}") from None
    if not text.strip():
        raise DataError(f"{local}: the file is empty")
    stem = local.name.split(".")[0]
    if ".jsonl" not in [s.lower() for s in local.suffixes] and text.lstrip()[:1] == "[":
        try:
            values = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DataError(f"{local}: not valid JSON: {str(exc)[:200]}") from None
        for i, value in enumerate(values, start=1):  # 1-based, as everywhere
            yield f"{stem}:{i}", f"{local} item {i}", value
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{local} line {number}"
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            value = DataError(f"{where}: not valid JSON: {str(exc)[:200]}")  # counted as read, then as bad
        yield f"{stem}:{number}", where, value


def read_records(path: str, name: str | None, split: str):
    """(row id, where, row) for every row of one source; JSON files are parsed here, the rest via datasets."""
    if path == MEMORY:
        raise DataError(f"data.path={MEMORY}: this run trained on rows given in memory (ORPOTrainer), which were not "
                        "saved; name the data to use (orpo eval RUN --data FILE, run.evaluate(data=...))")
    local = Path(path).expanduser()
    if local.is_file() and _kind(local) == "json":
        yield from _json_records(local)
        return
    rows = read_rows(path, name, split)
    stem = local.name.split(".")[0] if local.exists() else path.replace("/", "_")
    for i, row in enumerate(rows, start=1):  # 1-based, as everywhere
        yield f"{stem}:{i}", f"{path} row {i}", row


# ---------------------------------------------------------------- sources and mixtures


def entries(data: DataConfig) -> list[MixtureEntry]:
    """The sources of a run: data.mixture, or data.path as a one-entry mixture."""
    if data.mixture:
        return list(data.mixture)
    return [MixtureEntry(path=data.path, name=data.name, split=data.split, format=data.format, columns=data.columns,
                         num_samples=data.num_samples, min_score=data.min_score, drop_ties=data.drop_ties)]


def canonical_rows(records, entry: MixtureEntry, data: DataConfig, report: DataReport, untemplater=None) -> list[dict]:
    """(row id, where, row) records of one source -> canonical rows that pass its score filters; rows the chat
    template already rendered are read back into messages first (data.templated, when `untemplater` is given)."""
    bad = BadRows(data.on_bad_rows, report)
    rows, read, templated = [], 0, Counter()
    fmt, system_column = entry.format, entry.system_column or data.system_column
    for row_id, where, raw in records:
        read += 1
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, dict):
                raise DataError(f"{where}: expected a JSON object (mapping of columns), got {type(raw).__name__}")
            row = rename(raw, entry.columns, where)
            if untemplater is not None:
                row, layout = untemplater.row(row, where)
                templated[layout] += layout is not None
            if fmt == "auto":  # detect once per source, on its first good row
                fmt = detect_format(row)
            pair = canonical(row, fmt, where, None, system_column, data.system_prompt)
        except DataError as exc:
            bad(exc, row_id)
            continue
        own_id = raw.get("id")
        pair["id"] = str(own_id) if isinstance(own_id, str | int) and not isinstance(own_id, bool) else row_id
        pair["source"] = entry.path
        pair["max_tokens"] = entry.max_length or -1
        if _keep_by_score(pair, entry, report):
            rows.append(pair)
    report.read[entry.path] = report.read.get(entry.path, 0) + read
    report.formats[entry.path] = fmt
    if read == 0:
        raise DataError(f"{entry.path}: no rows")
    for layout, count in templated.items():
        if count:
            log.info("%s: %d of %d rows hold text the chat template already rendered (%s); read back into messages%s",
                     entry.path, count, read, TEMPLATED[layout], "; their prompt column is not used" if layout == "conversations" else "")
    return rows


def load_source(entry: MixtureEntry, data: DataConfig, report: DataReport, rng: random.Random, untemplater=None) -> list[dict]:
    """One source -> canonical rows after its score filters and sample size."""
    rows = canonical_rows(read_records(entry.path, entry.name, entry.split), entry, data, report, untemplater)
    size = entry.num_samples if entry.num_samples is not None else None
    if entry.weight is not None:
        size = round(entry.weight * len(rows))
    if size is None:
        return rows
    order = list(range(len(rows)))
    rng.shuffle(order)
    picked = (order * (size // max(len(order), 1) + 1))[:size] if size > len(order) else order[:size]
    return [rows[i] for i in picked]


def _keep_by_score(pair: dict, entry: MixtureEntry, report: DataReport) -> bool:
    good, worse = pair["score_chosen"], pair["score_rejected"]
    if (entry.min_score is not None or entry.drop_ties) and (good is None or (entry.drop_ties and worse is None)):
        report.drop("read/no_score", pair["id"])
        return False
    if entry.min_score is not None and good < entry.min_score:
        report.drop("read/below_min_score", pair["id"])
        return False
    if entry.drop_ties and good == worse:
        report.drop("read/tie", pair["id"])
        return False
    return True


def build_rows(data: DataConfig, report: DataReport, untemplater=None):
    """Canonical (train, eval or None) `datasets.Dataset`s of every source, shuffled and split with data.shuffle_seed."""
    import datasets

    rng = random.Random(data.shuffle_seed)
    rows = [r for entry in entries(data) for r in load_source(entry, data, report, rng, untemplater)]
    if not rows:
        raise DataError(f"no usable rows (dropped: {json.dumps(report.dropped)}; bad rows: {report.bad_rows[:2]})")
    train = datasets.Dataset.from_list(rows)
    train, test = sample_and_split(train, data if data.mixture else data.model_copy(update={"num_samples": None}))
    if data.eval_path is not None:
        eval_entry = MixtureEntry(path=data.eval_path, split=data.eval_split, format=data.format, columns=data.columns)
        test = datasets.Dataset.from_list(load_source(eval_entry, data, report, rng, untemplater))
    return train, test


def memory_records(rows, name: str):
    """(row id, where, row) of rows held in memory: a `datasets.Dataset` (a split), a list of mappings or a pandas
    DataFrame. Row numbers are 1-based, as everywhere."""
    import datasets

    if isinstance(rows, datasets.DatasetDict):
        raise DataError(f"{name} is a DatasetDict with splits {', '.join(rows)}: pass one split, e.g. {name}=dataset['train']")
    if hasattr(rows, "to_dict") and hasattr(rows, "columns") and not isinstance(rows, datasets.Dataset):  # pandas
        rows = rows.to_dict(orient="records")
    if isinstance(rows, dict) or isinstance(rows, str) or not hasattr(rows, "__iter__"):
        raise DataError(f"{name}: expected a datasets.Dataset, a list of rows (mappings) or a DataFrame, got {type(rows).__name__}")
    for i, row in enumerate(rows, start=1):
        yield f"{name}:{i}", f"{name} row {i}", row


def memory_rows(train_rows, eval_rows, data: DataConfig, report: DataReport, untemplater=None):
    """Canonical (train, eval or None) `datasets.Dataset`s of rows the caller holds in memory (ORPOTrainer's
    train_dataset and eval_dataset), in their own order: the caller already chose and split them."""
    import datasets

    def one(rows, name):
        entry = MixtureEntry(path=name, format=data.format, columns=data.columns)
        found = canonical_rows(memory_records(rows, name), entry, data, report, untemplater)
        if not found:
            raise DataError(f"{name}: no usable rows (dropped: {json.dumps(report.dropped)}; bad rows: {report.bad_rows[:2]})")
        return datasets.Dataset.from_list(found)

    return one(train_rows, "train_dataset"), None if eval_rows is None else one(eval_rows, "eval_dataset")


def sample_and_split(dataset, cfg: DataConfig):
    """Shuffle with cfg.shuffle_seed, keep cfg.num_samples rows, hold out cfg.test_size."""
    dataset = dataset.shuffle(seed=cfg.shuffle_seed)
    if cfg.num_samples is not None:
        dataset = dataset.select(range(min(cfg.num_samples, len(dataset))))
    if cfg.eval_path is not None or cfg.test_size == 0:
        return dataset, None
    return hold_out(dataset, cfg.test_size, "data.test_size", "test")


def hold_out(dataset, size: float, key: str, what: str):
    """(rest, held out): the last `size` rows (a share < 1, or a count >= 1) of an already shuffled dataset."""
    count = size if size < 1 else int(size)
    if isinstance(count, int) and count >= len(dataset) or round(count * len(dataset) if count < 1 else count) < 1:
        raise DataError(f"{key}={size} leaves no train or no {what} rows out of {len(dataset)}")
    parts = dataset.train_test_split(test_size=count, shuffle=False)
    return parts["train"], parts["test"]
