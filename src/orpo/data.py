"""Preference rows -> token ids -> `[chosen; rejected]` batches.

Pipeline: `read_rows` (files, Hub, builtin) -> `to_messages` (one canonical shape: prompt, chosen and
rejected as message lists) -> `tokenize_pair` (chat template applied once, prompt/response boundary found on
token ids, truncation) -> `collate` ((2B, T) input_ids, attention_mask, labels; chosen rows first, labels
-100 on prompt and pad tokens).

Rules that keep the scored tokens right (each is a trap seen in other trainers, see ORPO-NOTES):
- the prompt is the conversation up to the response, rendered with the generation header; for message
  lists without an explicit prompt it is the leading messages that chosen and rejected share, compared
  message by message (never by character prefix);
- the whole conversation is tokenized jointly and the prompt is the shared token prefix, so no prompt token
  is scored as response even where the template would merge tokens across the boundary;
- text from the template is tokenized without special tokens (the template writes its own BOS); BOS is
  prepended only when the tokenizer adds one by default and the template did not;
- each response ends with exactly one end-of-turn token (what the template writes after an assistant
  turn; anything the template adds after it, such as a newline, is not scored);
- over-long prompts keep their end (last turn and generation header), responses are cut to fit
  max_length; a pair with an empty response is dropped and counted, never scored as 0/0.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import BUILTIN, Config, DataConfig
from .loss import IGNORE

_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SENTINEL = "ORPO_SENTINEL_RESPONSE"


class DataError(ValueError):
    """A data problem, worded for the user (file, row, field)."""


# ---------------------------------------------------------------- reading


def read_rows(path: str, name: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a local file/folder or a Hub dataset name."""
    import datasets

    local = Path(path).expanduser()
    if local.is_file():
        kind = _FILE_KINDS.get("".join(local.suffixes[-1:]).lower())
        if kind is None:
            raise DataError(f"{local}: unsupported file type; use one of {', '.join(sorted(_FILE_KINDS))}")
        if local.stat().st_size == 0:
            raise DataError(f"{local}: the file is empty")
        try:
            return datasets.load_dataset(kind, data_files=str(local), split="train")
        except Exception as exc:  # datasets wraps parser errors in several types
            raise DataError(f"{local}: could not be read as {kind}: {exc}") from None
    if local.is_dir():
        if (local / "dataset_info.json").exists() or (local / "state.json").exists():
            loaded = datasets.load_from_disk(str(local))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(str(local), name, split=split)
    if path.startswith((".", "/", "~")) or path.endswith(tuple(_FILE_KINDS)):
        raise DataError(f"data file not found: {path}")
    from .hub import load_hub_dataset

    return load_hub_dataset(path, name, split)


def sample_and_split(dataset, cfg: DataConfig):
    """Shuffle with cfg.shuffle_seed, keep cfg.num_samples rows, hold out cfg.test_size."""
    dataset = dataset.shuffle(seed=cfg.shuffle_seed)
    if cfg.num_samples is not None:
        dataset = dataset.select(range(min(cfg.num_samples, len(dataset))))
    if cfg.eval_path is not None or cfg.test_size == 0:
        return dataset, None
    test_size = cfg.test_size if cfg.test_size < 1 else int(cfg.test_size)
    if isinstance(test_size, int) and test_size >= len(dataset) or round(test_size * len(dataset) if test_size < 1 else test_size) < 1:
        raise DataError(f"data.test_size={cfg.test_size} leaves no train or no test rows out of {len(dataset)}")
    parts = dataset.train_test_split(test_size=test_size, seed=cfg.shuffle_seed, shuffle=False)
    return parts["train"], parts["test"]


# ---------------------------------------------------------------- canonical messages


def _as_messages(value: Any, role: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        out = []
        for i, m in enumerate(value):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}[{i}]: a message needs string 'role' and 'content', got {m!r}"[:300])
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise DataError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")


def to_messages(row: dict[str, Any], where: str = "row") -> dict[str, list[dict[str, str]]]:
    """Canonical pair: prompt, chosen and rejected as message lists.

    chosen/rejected may be strings (prompt column required) or message lists. When the lists share leading
    messages, those are the prompt (implicit prompt, as in orpo-dpo-mix-40k); an explicit prompt column is
    then ignored, since using both would put the question in twice.
    """
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise DataError(f"{where}: missing field '{key}' (columns: {', '.join(sorted(row))})")
    chosen = _as_messages(row["chosen"], "assistant", f"{where}.chosen")
    rejected = _as_messages(row["rejected"], "assistant", f"{where}.rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared:
        return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    if row.get("prompt") is None:
        raise DataError(f"{where}: no prompt: the row has no 'prompt' field and chosen/rejected share no leading messages")
    return {"prompt": _as_messages(row["prompt"], "user", f"{where}.prompt"), "chosen": chosen, "rejected": rejected}


# ---------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class TokenSpec:
    """What tokenize_pair needs to know about the tokenizer, worked out once."""

    bos_id: int | None  # prepended when the tokenizer adds BOS by default and the template did not
    end_of_turn_id: int | None  # the token that closes an assistant turn in the template
    max_length: int
    max_prompt_length: int
    keep_end: bool


def end_of_turn_id(tokenizer) -> int | None:
    """The first special token the chat template writes after an assistant message's content."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
    )
    tail = rendered.split(_SENTINEL, 1)[1] if _SENTINEL in rendered else ""
    special = set(tokenizer.all_special_ids)
    for token in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token in special:
            return token
    return tokenizer.eos_token_id


def token_spec(tokenizer, config: Config) -> TokenSpec:
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    return TokenSpec(
        bos_id=bos if adds_bos else None,
        end_of_turn_id=end_of_turn_id(tokenizer),
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        keep_end=config.data.truncation_mode == "keep_end",
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _end_at_turn(response: list[int], eot: int | None) -> list[int]:
    """Cut what the template writes after the last end-of-turn; add one if the template wrote none."""
    if eot is None:
        return response
    if eot in response:
        last = len(response) - 1 - response[::-1].index(eot)
        return response[: last + 1]
    return response + [eot]


def tokenize_pair(pair: dict[str, list[dict[str, str]]], tokenizer, spec: TokenSpec) -> dict[str, Any]:
    """Token ids of one canonical pair: prompt_ids, chosen_ids, rejected_ids, and `drop` ('' when kept)."""
    if not any(m["content"].strip() for m in pair["chosen"]) or not any(m["content"].strip() for m in pair["rejected"]):
        return {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "drop": "empty_response"}

    def encode(messages, generation_prompt):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if spec.bos_id is not None and ids[:1] != [spec.bos_id]:
            ids = [spec.bos_id] + ids
        return ids

    prompt = encode(pair["prompt"], True)
    chosen_full = encode(pair["prompt"] + pair["chosen"], False)
    rejected_full = encode(pair["prompt"] + pair["rejected"], False)
    # The prompt is the token prefix all three share: a token merged across the boundary goes to the response.
    boundary = min(_common_prefix(prompt, chosen_full), _common_prefix(prompt, rejected_full))
    prompt = prompt[:boundary]
    chosen = _end_at_turn(chosen_full[boundary:], spec.end_of_turn_id)
    rejected = _end_at_turn(rejected_full[boundary:], spec.end_of_turn_id)

    if len(prompt) > spec.max_prompt_length:
        keep = spec.max_prompt_length
        if spec.keep_end:
            head = prompt[:1] if spec.bos_id is not None and prompt[:1] == [spec.bos_id] else []
            prompt = head + prompt[len(prompt) - (keep - len(head)) :]
        else:
            prompt = prompt[:keep]
    budget = spec.max_length - len(prompt)
    chosen, rejected = chosen[:budget], rejected[:budget]
    drop = "" if chosen and rejected else "empty_response"
    if not drop and chosen == rejected:
        drop = "identical_responses"
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "drop": drop}


@dataclass
class DataReport:
    """Counts of what the pipeline kept and dropped, for the log and summary.json."""

    train_rows: int = 0
    eval_rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"train_pairs": self.train_rows, "eval_pairs": self.eval_rows, "dropped": dict(self.dropped)}


def tokenize_dataset(dataset, tokenizer, spec: TokenSpec, report: DataReport, num_proc: int | None, label: str):
    """Map raw rows to token ids (in parallel when num_proc > 1), drop bad pairs and count them."""

    def one(row, index):
        return tokenize_pair(to_messages(row, where=f"{label} row {index}"), tokenizer, spec)

    keep = [c for c in ("id",) if c in dataset.column_names]
    drop_cols = [c for c in dataset.column_names if c not in keep]
    tokenized = dataset.map(
        one, with_indices=True, remove_columns=drop_cols, num_proc=num_proc, desc=f"tokenizing {label}"
    )
    for reason, count in Counter(tokenized["drop"]).items():
        if reason:
            report.dropped[f"{label}/{reason}"] = report.dropped.get(f"{label}/{reason}", 0) + count
    tokenized = tokenized.filter(lambda r: not r["drop"], desc=f"dropping bad {label} pairs")
    if len(tokenized) == 0:
        raise DataError(f"no {label} pairs left after tokenization (dropped: {json.dumps(report.dropped)})")
    return tokenized.remove_columns("drop")


def load_pairs(config: Config, tokenizer):
    """Raw rows -> (train, eval or None, raw eval rows, report). Raw eval rows feed task evaluation."""
    data = config.data
    if data.path == BUILTIN:
        import datasets

        from .builtin.tasks import generate, prompt_messages

        train_rows, eval_rows = generate(data.builtin_train_size, data.builtin_eval_size, seed=data.shuffle_seed)
        train_rows = [dict(r, prompt=prompt_messages(r)) for r in train_rows]
        eval_rows = [dict(r, prompt=prompt_messages(r)) for r in eval_rows]
        train_raw = datasets.Dataset.from_list(train_rows).shuffle(seed=data.shuffle_seed)
        if data.num_samples is not None:
            train_raw = train_raw.select(range(min(data.num_samples, len(train_raw))))
        eval_raw = datasets.Dataset.from_list(eval_rows)
    else:
        train_raw, eval_raw = sample_and_split(read_rows(data.path, data.name, data.split), data)
        if data.eval_path is not None:
            eval_raw = read_rows(data.eval_path, None, data.eval_split)
    spec = token_spec(tokenizer, config)
    report = DataReport()
    train = tokenize_dataset(train_raw, tokenizer, spec, report, data.num_proc, "train")
    evaluation = None if eval_raw is None else tokenize_dataset(eval_raw, tokenizer, spec, report, data.num_proc, "eval")
    report.train_rows, report.eval_rows = len(train), 0 if evaluation is None else len(evaluation)
    return train, evaluation, eval_raw, report


# ---------------------------------------------------------------- batching


def collate(records: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """B tokenized pairs -> (2B, T) tensors, chosen rows first, right-padded to the longest row."""
    rows, labels = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for r in records:
            rows.append(r["prompt_ids"] + r[side])
            labels.append([IGNORE] * len(r["prompt_ids"]) + r[side])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (2B, T)
    attention = torch.zeros((len(rows), width), dtype=torch.long)  # (2B, T)
    label_ids = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (2B, T)
    for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        label_ids[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}


class PairSampler:
    """Batches of row indices: a fresh seeded permutation per epoch, sharded over processes.

    Deterministic for (seed, epoch), so a resumed run rebuilds the same order and starts at `offset`
    batches into it. With several processes each global batch is split by rank and an incomplete last
    global batch is dropped, so every process runs the same number of micro-batches.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.num_rows, self.batch_size, self.seed, self.rank, self.world = num_rows, batch_size, seed, rank, world

    def batches_per_epoch(self) -> int:
        per_global = self.batch_size * self.world
        if self.world == 1:
            return -(-self.num_rows // per_global)
        return self.num_rows // per_global

    def epoch(self, epoch: int, offset: int = 0):
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        per_global = self.batch_size * self.world
        for b in range(offset, self.batches_per_epoch()):
            chunk = order[b * per_global : (b + 1) * per_global]
            yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
