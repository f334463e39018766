"""Preference rows -> token ids -> `[chosen; rejected]` batches.

Pipeline: `sources.build_rows` (files, Hub, mixtures; `formats.canonical` turns every layout into one shape:
prompt, chosen and rejected as message lists) -> `tokenize_rows` (batched `datasets.map`, cached on disk;
chat template applied once, prompt/response boundary found on token ids, truncation) -> `finish` (drops
counted) -> `collate` ((2B, T) input_ids, attention_mask, labels; chosen rows first, labels
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

import hashlib
import json
import logging
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..files import cache_root
from .formats import DataError, to_messages
from .sources import (
    DataReport,
    build_rows,
    hold_out,
    memory_rows,
    quiet_datasets,
    read_rows,
    sample_and_split,
)
from .templated import Untemplater

__all__ = ["DataError", "DataReport", "read_rows", "sample_and_split", "to_messages"]  # re-exported for callers

log = logging.getLogger(__name__)
IGNORE = -100  # the label of a token no loss term scores (the prompt's, padding), as transformers uses it
_SENTINEL = "ORPO_SENTINEL_RESPONSE"
_CACHE_VERSION = "1"  # bump when tokenize_batch changes what it writes
STAT_COLUMNS = ("prompt_len", "chosen_len", "rejected_len", "prompt_cut", "response_cut", "boundary_merged")


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


def bos_to_add(tokenizer) -> int | None:
    """BOS when the tokenizer adds it by default (then ids must start with it even if the template does not
    write it, as with Llama 3 under the ChatML set-up); else None."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def encode(tokenizer, texts: list[str], bos_id: int | None) -> list[list[int]]:
    """Token ids of rendered chat texts as training makes them: the template's special tokens only, plus BOS
    in front where `bos_id` is set and the template did not write it."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    if bos_id is not None:
        ids = [x if x[:1] == [bos_id] else [bos_id] + x for x in ids]
    return ids


def prompt_ids(tokenizer, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    """The ids of chat prompts (with the assistant header) exactly as training saw them: every path that feeds
    the model a prompt (task accuracy, `orpo chat`, the merge check) uses this."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return encode(tokenizer, texts, bos_to_add(tokenizer))


def token_spec(tokenizer, config: Config) -> TokenSpec:
    return TokenSpec(
        bos_id=bos_to_add(tokenizer),
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


def _empty(pair) -> bool:
    return not any(m["content"].strip() for m in pair["chosen"]) or not any(m["content"].strip() for m in pair["rejected"])


def _split_and_cut(prompt: list[int], chosen_full: list[int], rejected_full: list[int], spec: TokenSpec) -> dict[str, Any]:
    # The prompt is the token prefix all three share: a token merged across the boundary goes to the response.
    boundary = min(_common_prefix(prompt, chosen_full), _common_prefix(prompt, rejected_full))
    merged = boundary < len(prompt)  # tokenizing prompt and response apart would differ from the joint ids
    prompt = prompt[:boundary]
    chosen = _end_at_turn(chosen_full[boundary:], spec.end_of_turn_id)
    rejected = _end_at_turn(rejected_full[boundary:], spec.end_of_turn_id)
    stats = {"prompt_len": len(prompt), "chosen_len": len(chosen), "rejected_len": len(rejected), "boundary_merged": merged}

    stats["prompt_cut"] = len(prompt) > spec.max_prompt_length
    if stats["prompt_cut"]:
        keep = spec.max_prompt_length
        if spec.keep_end:
            head = prompt[:1] if spec.bos_id is not None and prompt[:1] == [spec.bos_id] else []
            prompt = head + prompt[len(prompt) - (keep - len(head)) :]
        else:
            prompt = prompt[:keep]
    budget = spec.max_length - len(prompt)
    stats["response_cut"] = max(len(chosen), len(rejected)) > budget  # a cut response loses its end-of-turn
    chosen, rejected = chosen[:budget], rejected[:budget]
    drop = "" if chosen and rejected else "empty_response"
    if not drop and chosen == rejected:
        drop = "identical_responses"
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "drop": drop, **stats}


CHARS_PER_TOKEN = 256  # more than any token of a real vocabulary covers


def _clip(pair: dict, spec: TokenSpec) -> dict:
    """The pair with any message longer than max_length * CHARS_PER_TOKEN characters cut to that (prompt messages
    keep their end when truncation keeps the end, responses their start): text that cannot fit is not tokenized,
    so a 50 MB row costs no more than a long one. The cut lies beyond anything that is kept."""
    limit = spec.max_length * CHARS_PER_TOKEN
    if all(len(m["content"]) <= limit for side in ("prompt", "chosen", "rejected") for m in pair[side]):
        return pair

    def cut(messages, keep_end):
        return [dict(m, content=(m["content"][-limit:] if keep_end else m["content"][:limit])) if len(m["content"]) > limit else m
                for m in messages]

    return {**pair, "prompt": cut(pair["prompt"], spec.keep_end), "chosen": cut(pair["chosen"], False), "rejected": cut(pair["rejected"], False)}


def tokenize_batch(pairs: list[dict[str, list[dict[str, str]]]], tokenizer, spec: TokenSpec) -> list[dict[str, Any]]:
    """Token ids of canonical pairs: prompt_ids, chosen_ids, rejected_ids, `drop` ('' when kept), and length stats.

    Each pair is rendered three times (prompt with generation header, prompt+chosen, prompt+rejected) and all
    texts go through the fast tokenizer in one call.
    """
    live = [i for i, p in enumerate(pairs) if not _empty(p)]
    texts = []
    for i in live:
        p = _clip(pairs[i], spec)
        texts.append(tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True))
        texts.append(tokenizer.apply_chat_template(p["prompt"] + p["chosen"], tokenize=False))
        texts.append(tokenizer.apply_chat_template(p["prompt"] + p["rejected"], tokenize=False))
    ids = encode(tokenizer, texts, spec.bos_id)
    empty = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "drop": "empty_response"}
    out = [{**empty, **{c: 0 if c.endswith("_len") else False for c in STAT_COLUMNS}} for _ in pairs]
    for k, i in enumerate(live):
        out[i] = _split_and_cut(ids[3 * k], ids[3 * k + 1], ids[3 * k + 2], spec)
    return out


def tokenize_pair(pair: dict[str, list[dict[str, str]]], tokenizer, spec: TokenSpec) -> dict[str, Any]:
    """One canonical pair -> token ids (see tokenize_batch)."""
    return tokenize_batch([pair], tokenizer, spec)[0]


def _fingerprint(dataset, tokenizer, spec: TokenSpec) -> str:
    """Cache key: the rows' content, the tokenizer (vocabulary, template, specials) and the TokenSpec."""
    digest = hashlib.sha256(_CACHE_VERSION.encode())
    digest.update(json.dumps(asdict(spec)).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer).encode())
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.all_special_tokens], default=str).encode())
    columns = [c for c in ("id", "prompt", "chosen", "rejected", "max_tokens") if c in dataset.column_names]
    for batch in dataset.select_columns(columns).iter(batch_size=2000):
        digest.update(json.dumps(batch, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:24]


def tokenize_rows(dataset, tokenizer, spec: TokenSpec, num_proc: int | None, cache_dir: Path | None, label: str):
    """Canonical rows -> token ids and stats (every row, `drop` says why one is unusable), cached on disk.

    The cache folder is keyed on `_fingerprint`; a hit is memory-mapped back without tokenizing again.
    """
    import datasets

    target = None
    if cache_dir is not None:
        target = cache_dir / _fingerprint(dataset, tokenizer, spec)
        if (target / "state.json").exists():
            log.info("%s: tokenized data from cache %s", label, target)
            with quiet_datasets():
                return datasets.load_from_disk(str(target))

    def batch(rows):
        pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(rows["prompt"], rows["chosen"], rows["rejected"], strict=True)]
        done = tokenize_batch(pairs, tokenizer, spec)
        out = {key: [d[key] for d in done] for key in done[0]} if done else {}
        limits = rows["max_tokens"] if "max_tokens" in rows else [-1] * len(pairs)
        for i, limit in enumerate(limits):  # a mixture entry's max_length drops long pairs instead of cutting them
            if limit > 0 and not out["drop"][i] and out["prompt_len"][i] + max(out["chosen_len"][i], out["rejected_len"][i]) > limit:
                out["drop"][i] = "too_long"
        return out

    keep = [c for c in ("id", "source") if c in dataset.column_names]
    tokenized = dataset.map(batch, batched=True, batch_size=256, remove_columns=[c for c in dataset.column_names if c not in keep],
                            # worker start-up costs more than it saves on small sets
                            num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) >= 512 else None, desc=f"tokenizing {label}")
    if target is not None:
        partial = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        with quiet_datasets():
            tokenized.save_to_disk(str(partial))
        try:
            partial.rename(target)
        except OSError:  # another run wrote the same key first
            shutil.rmtree(partial, ignore_errors=True)
        with quiet_datasets():
            tokenized = datasets.load_from_disk(str(target))
    return tokenized


def finish(tokenized, report: DataReport, label: str):
    """Count and drop unusable pairs, remove the stats columns."""
    drops = tokenized["drop"]
    ids = tokenized["id"] if "id" in tokenized.column_names else [str(i) for i in range(len(drops))]
    for reason, count in Counter(drops).items():
        if reason:
            examples = [ids[i] for i, d in enumerate(drops) if d == reason][:5]
            report.dropped[f"{label}/{reason}"] = report.dropped.get(f"{label}/{reason}", 0) + count
            report.examples.setdefault(f"{label}/{reason}", []).extend(examples)
    kept = tokenized.filter(lambda d: not d, input_columns="drop", desc=f"dropping bad {label} pairs")
    if len(kept) == 0:
        raise DataError(f"no {label} pairs left after tokenization (dropped: {json.dumps(report.dropped)})")
    return kept.remove_columns(["drop", *STAT_COLUMNS])


def cache_dir(config: Config) -> Path | None:
    if not config.data.cache:
        return None
    if config.data.cache_dir is not None:
        return Path(config.data.cache_dir).expanduser()
    return cache_root() / "tokenized"


@dataclass
class Prepared:
    """Everything load_pairs builds, before drops are applied: what `orpo data inspect` looks at."""

    train_rows: Any  # canonical rows (datasets.Dataset)
    eval_rows: Any
    eval_raw: Any  # rows as read, for task evaluation of the builtin set
    train_tokens: Any  # tokenized rows with `drop` and length stats
    eval_tokens: Any
    report: DataReport
    spec: TokenSpec


def prepare(config: Config, tokenizer, rows: tuple[Any, Any] | None = None) -> Prepared:
    """Sources -> canonical rows -> tokenized rows with stats (nothing dropped yet besides bad/filtered rows).
    `rows`: (train rows, eval rows or None) held in memory (ORPOTrainer's datasets), used instead of config.data's
    sources."""
    import datasets

    data, report = config.data, DataReport()
    if rows is not None:
        train_rows, eval_rows = memory_rows(*rows, data, report, Untemplater(tokenizer))
        eval_raw = eval_rows
    elif data.builtin:
        from .builtin_tasks import generate, prompt_messages

        train_raw, eval_raw = (
            [dict(r, prompt=prompt_messages(r)) for r in rows]
            for rows in generate(data.builtin_train_size, data.builtin_eval_size, seed=data.shuffle_seed)
        )

        def canon(rows, label):
            return datasets.Dataset.from_list([dict(to_messages(r), id=f"{label}:{i}") for i, r in enumerate(rows)])

        train_rows = canon(train_raw, "builtin-train").shuffle(seed=data.shuffle_seed)
        if data.num_samples is not None:
            train_rows = train_rows.select(range(min(data.num_samples, len(train_rows))))
        eval_rows = canon(eval_raw, "builtin-eval")
        report.read[data.path] = len(train_raw) + len(eval_raw)
        eval_raw = datasets.Dataset.from_list(eval_raw)
    else:
        train_rows, eval_rows = build_rows(data, report, Untemplater(tokenizer))
        eval_raw = eval_rows
    if data.validation_size:  # the test split (or eval_path) stays out: evaluations use validation rows
        train_rows, eval_rows = hold_out(train_rows, data.validation_size, "data.validation_size", "validation")
        eval_raw = eval_rows if not data.builtin else datasets.Dataset.from_list([train_raw[int(i.split(":")[1])] for i in eval_rows["id"]])
    spec = token_spec(tokenizer, config)
    where = cache_dir(config)
    train_tokens = tokenize_rows(train_rows, tokenizer, spec, data.num_proc, where, "train")
    eval_tokens = None if eval_rows is None else tokenize_rows(eval_rows, tokenizer, spec, data.num_proc, where, "eval")
    return Prepared(train_rows, eval_rows, eval_raw, train_tokens, eval_tokens, report, spec)


def load_pairs(config: Config, tokenizer, prepared: Prepared | None = None, rows: tuple[Any, Any] | None = None):
    """Raw rows -> (train, eval or None, raw eval rows, report). Raw eval rows feed task evaluation. `rows`: see prepare."""
    p = prepared or prepare(config, tokenizer, rows)
    train = finish(p.train_tokens, p.report, "train")
    evaluation = None if p.eval_tokens is None else finish(p.eval_tokens, p.report, "eval")
    p.report.train_rows, p.report.eval_rows = len(train), 0 if evaluation is None else len(evaluation)
    return train, evaluation, p.eval_raw, p.report


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
    batches into it. With several processes each global batch (`batch_size` x processes pairs) is split by
    rank; an incomplete last one is split as evenly as it goes, so no pair is dropped or repeated. A rank
    can then get an empty batch: the loop gives it a zero-weight pass (every process runs the same steps).
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.num_rows, self.batch_size, self.seed, self.rank, self.world = num_rows, batch_size, seed, rank, world

    def batches_per_epoch(self) -> int:
        return -(-self.num_rows // (self.batch_size * self.world))

    def epoch(self, epoch: int, offset: int = 0):
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        per_global = self.batch_size * self.world
        for b in range(offset, self.batches_per_epoch()):
            chunk = order[b * per_global : (b + 1) * per_global]  # full but for an epoch's last
            n = len(chunk)
            yield chunk[self.rank * n // self.world : (self.rank + 1) * n // self.world]
