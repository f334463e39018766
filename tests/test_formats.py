"""Preference formats, column mapping, system prompts, mixtures, and bad input (property-based)."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PAIRS, write_jsonl
from orpo.config import load_config
from orpo.data.formats import DataError, canonical, detect_format
from orpo.data.sources import DataReport, build_rows

U = {"role": "user", "content": "Add 2 and 3."}
A5 = {"role": "assistant", "content": "The answer is 5."}
A6 = {"role": "assistant", "content": "The answer is 6."}
HH_ROW = {
    "chosen": "\n\nHuman: Hello there!\n\nAssistant: How are you today?\n\nHuman: Add 2 and 3.\n\nAssistant: The answer is 5.",
    "rejected": "\n\nHuman: Hello there!\n\nAssistant: How are you today?\n\nHuman: Add 2 and 3.\n\nAssistant: The answer is 6.",
}
# Real shapes: UltraFeedback-binarized, argilla/distilabel (ratings), OpenAI preference, ShareGPT.
ULTRA_ROW = {"prompt": "Add 2 and 3.", "prompt_id": "ab12", "chosen": [U, A5], "rejected": [U, A6], "messages": [U, A5],
             "score_chosen": 8.0, "score_rejected": 3.0}
ARGILLA_ROW = {"dataset": "x", "chosen": [U, A5], "rejected": [U, A6], "chosen_rating": 5, "rejected_rating": 2}
OPENAI_ROW = {"input": {"messages": [{"role": "system", "content": "Be brief."}, U]}, "preferred_output": [A5], "non_preferred_output": [A6]}
SHAREGPT_ROW = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Add 2 and 3."}],
                "chosen": {"from": "gpt", "value": "The answer is 5."}, "rejected": "The answer is 6."}


@pytest.mark.parametrize(
    ("row", "fmt"),
    [(PAIRS[1], "prompt_response"), ({"chosen": [U, A5], "rejected": [U, A6]}, "messages"), (ULTRA_ROW, "ultrafeedback"),
     (ARGILLA_ROW, "ultrafeedback"), (HH_ROW, "hh_rlhf"), (OPENAI_ROW, "openai"), (SHAREGPT_ROW, "sharegpt")],
)
def test_every_format_is_detected_and_gives_the_same_pair(row, fmt):
    assert detect_format(row) == fmt
    pair = canonical(row, "auto", "row 0")
    assert canonical(row, fmt, "row 0") == pair  # forcing the format gives the same result
    assert pair["prompt"][-1] == U and pair["chosen"] == [A5] and pair["rejected"] == [A6]


def test_hh_rlhf_multi_turn_history_goes_to_the_prompt():
    pair = canonical(HH_ROW, "hh_rlhf", "row 0")
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user"]
    assert pair["prompt"][1]["content"] == "How are you today?" and not pair["explicit_prompt"]


def test_scores_system_prompt_and_columns():
    assert canonical(ULTRA_ROW, "auto", "r")[("score_chosen")] == 8.0
    assert canonical(ARGILLA_ROW, "auto", "r")["score_rejected"] == 2.0
    pair = canonical(OPENAI_ROW, "auto", "r", system_prompt="Default.")
    assert pair["prompt"][0]["content"] == "Be brief."  # the row's own system turn wins over the default
    pair = canonical(PAIRS[1], "auto", "r", system_prompt="Default.")
    assert pair["prompt"][0] == {"role": "system", "content": "Default."}
    row = {"question": "Add 2 and 3.", "good": "5", "bad": "6", "sys": "Be brief."}
    pair = canonical(row, "auto", "r", columns={"prompt": "question", "chosen": "good", "rejected": "bad"}, system_column="sys")
    assert pair["prompt"] == [{"role": "system", "content": "Be brief."}, U] and pair["chosen"][0]["content"] == "5"


@pytest.mark.parametrize(
    ("row", "kwargs", "fragment"),
    [
        ({"prompt": "a", "chosen": "b"}, {}, "missing field 'rejected'"),
        ({"prompt": "a", "chosen": [{"content": "b"}], "rejected": "c"}, {}, r"chosen\[0\].*'role' and 'content'"),
        ({"prompt": "a", "chosen": [{"role": "wizard", "content": "b"}], "rejected": "c"}, {}, "unknown role 'wizard'"),
        ({"prompt": "a", "chosen": 3, "rejected": "c"}, {}, "chosen: expected a string or a list of messages, got int"),
        ({"prompt": "a", "chosen": [{"role": "assistant", "content": 5}], "rejected": "c"}, {}, "string 'role' and 'content'"),
        ({"prompt": "a", "chosen": [], "rejected": "c"}, {}, "empty"),
        ({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": "high"}, {}, "score_chosen: expected a number"),
        ({"q": "a", "chosen": "b", "rejected": "c"}, {"columns": {"prompt": "question"}}, "maps 'prompt' to column 'question'"),
        ({"chosen": "Human: hi", "rejected": 4}, {}, "rejected: expected an hh-rlhf transcript"),
        ({"input": "hi", "preferred_output": [], "non_preferred_output": []}, {}, "input: expected a mapping"),
        ({"prompt": "a", "chosen": [U], "rejected": "c"}, {}, "must end with an assistant message"),
        (["not", "a", "row"], {}, "expected a JSON object"),
    ],
)
def test_row_errors_name_row_and_field(row, kwargs, fragment):
    with pytest.raises(DataError, match=fragment) as info:
        canonical(row, "auto", "f.jsonl line 7", **kwargs)
    assert "f.jsonl line 7" in str(info.value)


def data_config(path, *extra):
    return load_config(None, [f"data.path={path}", "data.test_size=0.25", *extra]).data


def test_bad_lines_raise_or_are_skipped_and_counted(tmp_path):
    lines = [json.dumps(PAIRS[0]), "{not json", json.dumps({"prompt": "a", "chosen": "b"}), json.dumps(PAIRS[1]), "", json.dumps(PAIRS[2]), json.dumps(PAIRS[3])]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        build_rows(data_config(path), DataReport())
    report = DataReport()
    train, test = build_rows(data_config(path, "data.on_bad_rows=skip"), report)
    assert len(train) + len(test) == 4 and report.read[str(path)] == 6
    assert report.dropped == {"read/bad_row": 2} and report.examples["read/bad_row"] == ["bad:2", "bad:3"]  # ids are 1-based line numbers
    assert "line 3: missing field 'rejected'" in report.bad_rows[1]


def test_empty_and_blank_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    for name in ("empty.jsonl", "blank.jsonl"):
        with pytest.raises(DataError, match="empty"):
            build_rows(data_config(tmp_path / name), DataReport())


def test_mixture_sizes_filters_and_determinism(tmp_path):
    scored = [dict(p, score_chosen=float(i % 5), score_rejected=2.0) for i, p in enumerate(PAIRS * 5)]  # 30 rows
    a = write_jsonl(tmp_path / "a.jsonl", scored)
    b = write_jsonl(tmp_path / "b.jsonl", [{"input": {"messages": [U]}, "preferred_output": [A5], "non_preferred_output": [A6]}] * 10)
    mixture = f"[{{path: {a}, num_samples: 12, min_score: 1, drop_ties: true}}, {{path: {b}, weight: 0.5, format: openai}}]"
    cfg = load_config(None, [f"data.mixture={mixture}", "data.test_size=4"]).data
    report = DataReport()
    train, test = build_rows(cfg, report)
    assert len(train) + len(test) == 12 + 5
    assert report.dropped == {"read/below_min_score": 6, "read/tie": 6}  # scores 0 (6 rows) and 2 (ties, 6 rows)
    assert report.formats == {str(a): "prompt_response", str(b): "openai"}
    again, _ = build_rows(cfg, DataReport())
    assert train["id"] == again["id"]
    other, _ = build_rows(cfg.model_copy(update={"shuffle_seed": 7}), DataReport())
    assert other["id"] != train["id"]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["data.mixture=[{path: a.jsonl, num_samples: 3, weight: 0.5}]"], "num_samples or weight, not both"),
        (["data.path=x.jsonl", "data.mixture=[{path: a.jsonl}]"], "data.path or data.mixture"),
        (["data.mixture=[{path: a.jsonl}]", "data.num_samples=3"], "per entry"),
        (["data.mixture=[{weight: 0.5}]"], "data.mixture.0.path"),
        (["data.mixture=[{path: a.jsonl, colour: red}]"], "unknown key 'data.mixture.0.colour'"),
        (["data.columns={answer: good}"], "unknown column name(s) answer"),
        (["data.format=alpaca"], "hh_rlhf"),
        (["data.on_bad_rows=ignore"], "skip"),
    ],
)
def test_invalid_data_configs(overrides, fragment):
    from orpo.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value), str(info.value)


# ---------------------------------------------------------------- property-based: only our errors come out

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "from", "value", "x"]), children, max_size=3),
    max_leaves=8,
)
row_keys = st.sampled_from(["prompt", "chosen", "rejected", "input", "preferred_output", "non_preferred_output", "conversations",
                            "score_chosen", "score_rejected", "id", "messages"])
rows = st.dictionaries(row_keys, json_values, max_size=5) | json_values


@settings(max_examples=300, deadline=None)
@given(row=rows, fmt=st.sampled_from(["auto", "prompt_response", "messages", "hh_rlhf", "openai", "sharegpt", "ultrafeedback"]))
def test_malformed_rows_give_only_data_errors(row, fmt):
    try:
        pair = canonical(row, fmt, "row 0")
    except DataError:
        return
    assert all(isinstance(m["content"], str) for side in ("prompt", "chosen", "rejected") for m in pair[side])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=string.printable + "{}[]\":,\u00e9\ud7ff", max_size=200) | st.lists(rows, max_size=4).map(lambda rs: "\n".join(json.dumps(r) for r in rs)),
       suffix=st.sampled_from([".jsonl", ".json"]), skip=st.booleans())
def test_malformed_files_give_only_data_errors(tmp_path, text, suffix, skip):
    path = tmp_path / f"data{suffix}"
    path.write_text(text)
    try:
        build_rows(data_config(path, f"data.on_bad_rows={'skip' if skip else 'error'}", "data.test_size=0", "eval_on_start=false", "eval_steps=null"), DataReport())
    except DataError:
        pass


def test_invalid_utf8_and_lone_surrogates(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(DataError, match="UTF-8"):
        build_rows(data_config(tmp_path / "bin.jsonl"), DataReport())
    (tmp_path / "sur.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "\\ud800", "rejected": "c"}).replace("\\\\", "\\") + "\n")
    with pytest.raises(DataError, match="lone surrogate"):
        build_rows(data_config(tmp_path / "sur.jsonl"), DataReport())
