"""The data doctor: `orpo data inspect`, and the same checks before `orpo train` starts.

It runs the training data pipeline (pairs.prepare) and reports
- rows read, kept and dropped, each drop with its reason and example row ids;
- token lengths of prompt, chosen, rejected and pair (p50/p90/p99/max) and the share cut at
  max_prompt_length / max_length;
- findings, each an error (training refuses to start unless data.allow_errors=true) or a warning (logged):

| check | level | what it catches |
| --- | --- | --- |
| prompt_in_response | error | the prompt text (or chat-template markup) repeated inside chosen/rejected: it would be scored as response |
| whitespace_only_difference | error | chosen and rejected differ only in whitespace: the pair teaches nothing but formatting |
| identical_responses | warning | chosen == rejected (dropped) |
| empty_response | warning | an empty response (dropped; would be a 0/0 NaN elsewhere) |
| train_test_overlap | warning | prompts found in both train and test |
| truncated_response | warning | responses cut at max_length, so they no longer end with the end-of-turn token |
| boundary_merge | warning | tokenizing prompt and response apart differs from the joint tokenization at the boundary |
| bad_rows | warning | malformed rows skipped under data.on_bad_rows=skip |

- three rendered examples with the scored (response) tokens inside `[[...]]`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..config import Config
from .formats import DataError
from .pairs import STAT_COLUMNS, Prepared, load_pairs, prepare

log = logging.getLogger(__name__)
_EXAMPLES = 5
_MARKUP = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|eot_id|>", "[INST]", "<start_of_turn>")
_MIN_ECHO = 16  # shorter prompts ("Hi") appear inside answers by chance


def _finding(check: str, level: str, ids: list[str], total: int, message: str) -> dict[str, Any]:
    return {"check": check, "level": level, "count": len(ids), "share": len(ids) / max(total, 1),
            "examples": ids[:_EXAMPLES], "message": message}


def _squash(messages: list[dict[str, str]]) -> str:
    return "".join("".join(m["content"].split()) for m in messages)


def text_findings(rows, label: str) -> list[dict[str, Any]]:
    """Checks on canonical message lists (before tokenization)."""
    found: dict[str, list[str]] = {"prompt_in_response": [], "whitespace_only_difference": [], "identical_responses": [], "empty_response": []}
    ids = rows["id"] if "id" in rows.column_names else [str(i) for i in range(len(rows))]
    explicit = rows["explicit_prompt"] if "explicit_prompt" in rows.column_names else [True] * len(rows)
    for row_id, prompt, chosen, rejected, own in zip(ids, rows["prompt"], rows["chosen"], rows["rejected"], explicit, strict=True):
        last = next((m["content"].strip() for m in reversed(prompt) if m["role"] == "user"), "")
        responses = [m["content"] for m in chosen + rejected]
        # An echo matters only for a prompt column of its own (a shared-history prompt cannot be doubled).
        echo = own and len(last) >= _MIN_ECHO and any(last in text for text in responses)
        if echo or any(mark in text for text in responses for mark in _MARKUP):
            found["prompt_in_response"].append(row_id)
        if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
            found["empty_response"].append(row_id)
        elif chosen == rejected:
            found["identical_responses"].append(row_id)
        elif _squash(chosen) == _squash(rejected):
            found["whitespace_only_difference"].append(row_id)
    n = len(rows)
    return [
        _finding("prompt_in_response", "error", found["prompt_in_response"], n,
                 f"{label}: the prompt (or chat-template markup) is repeated inside chosen/rejected; it would be scored as response. Fix the columns (data.columns) or the format (data.format)."),
        _finding("whitespace_only_difference", "error", found["whitespace_only_difference"], n,
                 f"{label}: chosen and rejected differ only in whitespace; the pair teaches formatting, not preference."),
        _finding("identical_responses", "warning", found["identical_responses"], n, f"{label}: chosen and rejected are identical (dropped)."),
        _finding("empty_response", "warning", found["empty_response"], n, f"{label}: empty chosen or rejected response (dropped)."),
    ]


def overlap_finding(train_rows, eval_rows) -> dict[str, Any]:
    def key(prompt):
        return json.dumps(prompt, sort_keys=True)

    test_prompts = {key(p) for p in eval_rows["prompt"]}
    ids = [i for i, p in zip(train_rows["id"], train_rows["prompt"], strict=True) if key(p) in test_prompts]
    return _finding("train_test_overlap", "warning", ids, len(train_rows), "train: prompts that also appear in the test split (the test score is optimistic).")


def _live(tokens) -> dict[str, list]:
    """Stats columns of the pairs that were tokenized (not empty), as lists."""
    cols = {c: tokens[c] for c in ("drop", *STAT_COLUMNS)}
    cols["id"] = tokens["id"] if "id" in tokens.column_names else [str(i) for i in range(len(tokens))]
    keep = [i for i, d in enumerate(cols["drop"]) if d != "empty_response"]
    return {c: [v[i] for i in keep] for c, v in cols.items()}


def token_findings(tokens, label: str, eot: str | None) -> list[dict[str, Any]]:
    live = _live(tokens)
    cut = [i for i, c in zip(live["id"], live["response_cut"], strict=True) if c]
    merged = [i for i, m in zip(live["id"], live["boundary_merged"], strict=True) if m]
    n = len(live["id"])
    return [
        _finding("truncated_response", "warning", cut, n, f"{label}: responses cut at max_length no longer end with the end-of-turn token {eot!r}; raise max_length or filter long pairs."),
        _finding("boundary_merge", "warning", merged, n, f"{label}: tokenizing prompt and response apart differs from the joint tokenization at the boundary; orpo uses the joint ids (no prompt token is scored)."),
    ]


def _percentiles(values: list[int]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "max": int(a.max())}


def length_stats(tokens, config: Config) -> dict[str, Any]:
    """Untruncated token lengths and the share cut by max_prompt_length / max_length."""
    live = _live(tokens)
    p, c, r = live["prompt_len"], live["chosen_len"], live["rejected_len"]
    pair = [a + max(b, d) for a, b, d in zip(p, c, r, strict=True)]
    n = max(len(p), 1)
    return {
        "pairs": len(p),
        "prompt": _percentiles(p), "chosen": _percentiles(c), "rejected": _percentiles(r), "pair": _percentiles(pair),
        "cut_at_max_prompt_length": sum(live["prompt_cut"]) / n, "cut_at_max_length": sum(live["response_cut"]) / n,
        "max_prompt_length": config.max_prompt_length, "max_length": config.max_length,
    }


def rendered_examples(kept, tokenizer, count: int = 3) -> list[dict[str, str]]:
    """Prompt + response text with the scored tokens inside [[...]]."""
    out = []
    for row in kept.select(range(min(count, len(kept)))):
        prompt = tokenizer.decode(row["prompt_ids"])
        out.append({"id": row.get("id", ""), **{side: prompt + "[[" + tokenizer.decode(row[f"{side}_ids"]) + "]]" for side in ("chosen", "rejected")}})
    return out


def diagnose(config: Config, tokenizer, prepared: Prepared) -> dict[str, Any]:
    """The inspect report (a JSON-able dict) of prepared data; also fills prepared.report."""
    return _diagnose(config, tokenizer, prepared)[0]


def _diagnose(config: Config, tokenizer, prepared: Prepared):
    """(inspect report, kept train pairs, kept eval pairs or None): the drops are applied once, here."""
    eot_id = prepared.spec.end_of_turn_id
    eot = tokenizer.convert_ids_to_tokens(eot_id) if eot_id is not None else None
    findings = text_findings(prepared.train_rows, "train") + token_findings(prepared.train_tokens, "train", eot)
    if prepared.eval_rows is not None:
        findings += text_findings(prepared.eval_rows, "test") + token_findings(prepared.eval_tokens, "test", eot)
        if "id" in prepared.train_rows.column_names:
            findings.append(overlap_finding(prepared.train_rows, prepared.eval_rows))
    report = prepared.report
    if report.dropped.get("read/bad_row"):
        findings.append({"check": "bad_rows", "level": "warning", "count": report.dropped["read/bad_row"], "share": None,
                         "examples": report.examples.get("read/bad_row", []), "message": "malformed rows skipped (data.on_bad_rows=skip): " + " | ".join(report.bad_rows[:3])})
    findings = [f for f in findings if f["count"]]
    lengths = {"train": length_stats(prepared.train_tokens, config)}
    if prepared.eval_tokens is not None:
        lengths["test"] = length_stats(prepared.eval_tokens, config)
    train, evaluation, _, report = load_pairs(config, tokenizer, prepared)
    result = {
        "rows": {"read": dict(report.read), "formats": dict(report.formats), "train_rows": len(prepared.train_rows),
                 "test_rows": 0 if prepared.eval_rows is None else len(prepared.eval_rows),
                 "kept": {"train": len(train), "test": 0 if evaluation is None else len(evaluation)},
                 "dropped": dict(report.dropped), "drop_examples": {k: list(v) for k, v in report.examples.items()}},
        "lengths": lengths,
        "findings": findings,
        "errors": sum(f["level"] == "error" for f in findings),
        "warnings": sum(f["level"] == "warning" for f in findings),
        "examples": rendered_examples(train, tokenizer),
    }
    return result, train, evaluation


def load_checked(config: Config, tokenizer, rows=None):
    """load_pairs behind the doctor: warnings go to the log, errors stop the run unless data.allow_errors.
    `rows`: (train rows, eval rows or None) held in memory instead of config.data's sources (pairs.prepare)."""
    prepared = prepare(config, tokenizer, rows)
    result, train, evaluation = _diagnose(config, tokenizer, prepared)
    for f in result["findings"]:
        (log.error if f["level"] == "error" else log.warning)("data %s: %s (%d rows, e.g. %s)", f["check"], f["message"], f["count"], ", ".join(map(str, f["examples"][:3])))
    errors = [f for f in result["findings"] if f["level"] == "error"]
    if errors and not config.data.allow_errors:
        lines = "\n  ".join(f"{f['check']}: {f['count']} rows, e.g. {', '.join(map(str, f['examples'][:3]))}: {f['message']}" for f in errors)
        raise DataError(f"the data doctor found errors (see `orpo data inspect`; data.allow_errors=true trains anyway):\n  {lines}")
    prepared.report.findings = [{k: v for k, v in f.items() if k != "examples"} for f in result["findings"]]
    return train, evaluation, prepared.eval_raw, prepared.report


def format_report(result: dict[str, Any]) -> str:
    """The inspect report as text."""
    rows = result["rows"]
    lines = ["rows read: " + ", ".join(f"{k}: {v} ({rows['formats'].get(k, '?')})" for k, v in rows["read"].items()),
             f"split: {rows['train_rows']} train, {rows['test_rows']} test; kept {rows['kept']['train']} train, {rows['kept']['test']} test"]
    for key, count in rows["dropped"].items():
        lines.append(f"  dropped {key}: {count} (e.g. {', '.join(map(str, rows['drop_examples'].get(key, [])[:3]))})")
    for label, stats in result["lengths"].items():
        lines.append(f"\n{label + ' token lengths (' + str(stats['pairs']) + ' pairs)':<36}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}")
        for part in ("prompt", "chosen", "rejected", "pair"):
            q = stats[part]
            lines.append(f"  {part:<34}{q['p50']:>7.0f}{q['p90']:>7.0f}{q['p99']:>7.0f}{q['max']:>7}")
        lines.append(f"  cut at max_prompt_length={stats['max_prompt_length']}: {100 * stats['cut_at_max_prompt_length']:.1f}%; "
                     f"at max_length={stats['max_length']}: {100 * stats['cut_at_max_length']:.1f}%")
    lines.append(f"\nfindings: {result['errors']} errors, {result['warnings']} warnings")
    for f in result["findings"]:
        lines.append(f"  {f['level'].upper():<8}{f['check']}: {f['count']} rows (e.g. {', '.join(map(str, f['examples'][:3]))})\n          {f['message']}")
    for ex in result["examples"]:
        lines.append(f"\nexample {ex['id']} (scored tokens in [[...]])\n--- chosen\n{ex['chosen']}\n--- rejected\n{ex['rejected']}")
    return "\n".join(lines)


def run_inspect(config: Config, tokenizer, as_json: bool = False) -> int:
    """`orpo data inspect`: print the report for the config's tokenizer (model.load_tokenizer's, ChatML set-up
    included); exit status 1 when it has errors."""
    import datasets

    datasets.disable_progress_bars()
    try:
        result = diagnose(config, tokenizer, prepare(config, tokenizer))
    except DataError as exc:
        print(f"orpo: data error: {exc}")
        return 1
    print(json.dumps(result, indent=2) if as_json else format_report(result))
    return 1 if result["errors"] else 0
