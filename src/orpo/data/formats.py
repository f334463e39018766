"""Preference-data layouts -> one canonical pair: prompt, chosen and rejected as message lists.

Formats (`data.format`, `auto` detects from the row's columns):

| format | columns |
| --- | --- |
| `prompt_response` | `prompt`, `chosen`, `rejected` strings |
| `messages` | `chosen`/`rejected` message lists, prompt explicit (`prompt`) or implicit (shared leading messages) |
| `ultrafeedback` | `messages` whose lists hold the prompt turn, plus scores (`score_chosen`/`score_rejected`, `chosen_rating`/`rejected_rating`) |
| `hh_rlhf` | `chosen`/`rejected` transcripts of `\\n\\nHuman:` / `\\n\\nAssistant:` turns sharing the history |
| `openai` | `input.messages`, `preferred_output`, `non_preferred_output` (lists of assistant messages) |
| `sharegpt` | `conversations` (`from`/`value`), `chosen`/`rejected` as a message or a string |

`data.columns` renames source columns first (`{prompt: question, chosen: good, rejected: bad}`). A system turn
comes from `data.system_column` or, when the prompt has none, from `data.system_prompt`.
Every problem is a `DataError` naming the row and the field.
"""

from __future__ import annotations

import re
from typing import Any

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "prompt_response", "messages", "ultrafeedback", "hh_rlhf", "openai", "sharegpt")
SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("chosen_rating", "rejected_rating"), ("chosen_score", "rejected_score"))
# ShareGPT speaker names seen in the wild -> our roles.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                   "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


class DataError(ValueError):
    """A data problem, worded for the user (file, row, field)."""


def _type(value: Any) -> str:
    return type(value).__name__


def _text(value: str, where: str) -> str:
    """Reject strings that cannot be written as UTF-8 (lone surrogates from JSON escapes break Arrow later)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: the text is not valid Unicode (a lone surrogate escape?)") from None
    return value


def _message(m: Any, where: str, sharegpt: bool = False) -> dict[str, str]:
    if not isinstance(m, dict):
        raise DataError(f"{where}: a message must be a mapping with 'role' and 'content', got {_type(m)}")
    if sharegpt and "from" in m:
        role, content = m.get("from"), m.get("value")
        role = _SHAREGPT_ROLES.get(role.lower(), role) if isinstance(role, str) else role
    else:
        role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
        raise DataError(f"{where}: a message needs string 'role' and 'content', got {m!r}"[:300])
    _text(content, where)
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r}; allowed: {', '.join(ROLES)}")
    return {"role": role, "content": content}


def as_messages(value: Any, role: str, where: str, sharegpt: bool = False) -> list[dict[str, str]]:
    """A string (one message of `role`), a message, or a list of messages -> a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": _text(value, where)}]
    if isinstance(value, dict):
        return [_message(value, where, sharegpt)]
    if isinstance(value, list) and value:
        return [_message(m, f"{where}[{i}]", sharegpt) for i, m in enumerate(value)]
    if isinstance(value, list):
        raise DataError(f"{where}: the message list is empty")
    raise DataError(f"{where}: expected a string or a list of messages, got {_type(value)}")


def _need(row: dict, key: str, where: str) -> Any:
    if key in row and row[key] is None:
        raise DataError(f"{where}: field '{key}' is null")
    if key not in row:
        raise DataError(f"{where}: missing field '{key}' (columns: {', '.join(sorted(map(str, row)))})")
    return row[key]


def _split_shared(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Leading messages both lists share (compared whole, never by character prefix) -> prompt."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def to_messages(row: dict[str, Any], where: str = "row") -> dict[str, list[dict[str, str]]]:
    """`prompt_response` / `messages` rows: chosen/rejected strings or message lists, prompt explicit or implicit.

    `explicit_prompt` says whether the prompt came from a column of its own (where it may be repeated inside
    chosen/rejected, the doctor's prompt_in_response check) or from the shared leading messages.

    When the lists share leading messages, those are the prompt (implicit prompt, as in orpo-dpo-mix-40k and
    UltraFeedback); an explicit prompt column is then ignored, since using both would put the question in twice.
    """
    chosen = as_messages(_need(row, "chosen", where), "assistant", f"{where}.chosen")
    rejected = as_messages(_need(row, "rejected", where), "assistant", f"{where}.rejected")
    prompt, chosen_tail, rejected_tail = _split_shared(chosen, rejected)
    if prompt:
        return {"prompt": prompt, "chosen": chosen_tail, "rejected": rejected_tail, "explicit_prompt": False}
    if row.get("prompt") is None:
        raise DataError(f"{where}: no prompt: the row has no 'prompt' field and chosen/rejected share no leading messages")
    return {"prompt": as_messages(row["prompt"], "user", f"{where}.prompt"), "chosen": chosen, "rejected": rejected, "explicit_prompt": True}


def parse_hh(text: Any, where: str) -> list[dict[str, str]]:
    """An hh-rlhf transcript (`\\n\\nHuman: ...\\n\\nAssistant: ...`) -> messages (content stripped)."""
    if not isinstance(text, str):
        raise DataError(f"{where}: expected an hh-rlhf transcript string, got {_type(text)}")
    _text(text, where)
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: not an hh-rlhf transcript: it must start with '\\n\\nHuman:' turns, got {text[:60]!r}")
    speakers, contents = parts[1::2], parts[2::2]
    return [{"role": "user" if s == "Human" else "assistant", "content": c.strip()} for s, c in zip(speakers, contents, strict=True)]


def from_hh(row: dict, where: str) -> dict:
    chosen = parse_hh(_need(row, "chosen", where), f"{where}.chosen")
    rejected = parse_hh(_need(row, "rejected", where), f"{where}.rejected")
    prompt, chosen, rejected = _split_shared(chosen, rejected)
    if not prompt:
        raise DataError(f"{where}: chosen and rejected transcripts share no leading turn (the prompt)")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "explicit_prompt": False}


def from_openai(row: dict, where: str) -> dict:
    source = _need(row, "input", where)
    if not isinstance(source, dict) or not isinstance(source.get("messages"), list):
        raise DataError(f"{where}.input: expected a mapping with a 'messages' list, got {_type(source)}")
    return {
        "prompt": as_messages(source["messages"], "user", f"{where}.input.messages"),
        "chosen": as_messages(_need(row, "preferred_output", where), "assistant", f"{where}.preferred_output"),
        "rejected": as_messages(_need(row, "non_preferred_output", where), "assistant", f"{where}.non_preferred_output"),
        "explicit_prompt": True,
    }


def from_sharegpt(row: dict, where: str) -> dict:
    return {
        "prompt": as_messages(_need(row, "conversations", where), "user", f"{where}.conversations", sharegpt=True),
        "chosen": as_messages(_need(row, "chosen", where), "assistant", f"{where}.chosen", sharegpt=True),
        "rejected": as_messages(_need(row, "rejected", where), "assistant", f"{where}.rejected", sharegpt=True),
        "explicit_prompt": True,
    }


def detect_format(row: dict) -> str:
    """The layout of one (already renamed) row; `auto` resolves to this on each dataset's first row."""
    if "preferred_output" in row or "non_preferred_output" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    chosen = row.get("chosen")
    if isinstance(chosen, str) and row.get("prompt") is None and chosen.lstrip().startswith("Human:"):
        return "hh_rlhf"
    if isinstance(chosen, list):
        return "ultrafeedback" if any(a in row for a, _ in SCORE_COLUMNS) else "messages"
    return "prompt_response"


def rename(row: dict, columns: dict[str, str], where: str) -> dict:
    """Apply `data.columns` ({our name: source column}); a mapped column missing from the row is an error."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns}
    for ours, theirs in columns.items():
        if theirs not in row:
            raise DataError(f"{where}: data.columns maps '{ours}' to column '{theirs}', which the row lacks (columns: {', '.join(sorted(map(str, row)))})")
        out[ours] = row[theirs]
    return out


def scores(row: dict, where: str) -> tuple[float | None, float | None]:
    """Chosen and rejected scores from the first score-column pair present, else (None, None)."""
    for a, b in SCORE_COLUMNS:
        if a in row or b in row:
            values = []
            for key in (a, b):
                v = row.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                    raise DataError(f"{where}.{key}: expected a number, got {_type(v)}")
                values.append(None if v is None else float(v))
            return values[0], values[1]
    return None, None


def canonical(row: Any, fmt: str, where: str, columns: dict[str, str] | None = None,
              system_column: str | None = None, system_prompt: str | None = None) -> dict[str, Any]:
    """One source row -> {prompt, chosen, rejected, explicit_prompt, score_chosen, score_rejected}; DataError on any problem."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object (mapping of columns), got {_type(row)}")
    row = rename(row, columns or {}, where)
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind == "hh_rlhf":
        pair = from_hh(row, where)
    elif kind == "openai":
        pair = from_openai(row, where)
    elif kind == "sharegpt":
        pair = from_sharegpt(row, where)
    else:
        pair = to_messages(row, where)
    for side in ("chosen", "rejected"):
        if pair[side][-1]["role"] != "assistant":
            raise DataError(f"{where}.{side}: the response must end with an assistant message, got role {pair[side][-1]['role']!r}")
    system = None
    if system_column is not None:
        system = _need(row, system_column, where)
        if not isinstance(system, str):
            raise DataError(f"{where}.{system_column}: the system prompt must be a string, got {_type(system)}")
        _text(system, f"{where}.{system_column}")
    if (system is None or not system.strip()) and pair["prompt"][0]["role"] != "system":
        system = system_prompt
    if system and system.strip() and pair["prompt"][0]["role"] != "system":
        pair["prompt"] = [{"role": "system", "content": system}] + pair["prompt"]
    pair["score_chosen"], pair["score_rejected"] = scores(row, where)
    return pair
