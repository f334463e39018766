"""The data doctor: each pitfall has a dataset that has it and the report names it; real data counts; cache."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import PAIRS, SHARED, make_tokenizer, write_jsonl
from orpo.cli import main
from orpo.config import load_config
from orpo.data.doctor import diagnose, load_checked
from orpo.data.formats import DataError
from orpo.data.pairs import prepare

HH = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
ORCA = SHARED / "data" / "orca-dpo-pairs-validation.jsonl"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat=True)


def inspect(tok, path, tmp_path, *extra):
    config = load_config(None, [f"data.path={path}", "data.test_size=2", f"data.cache_dir={tmp_path / 'cache'}",
                                "max_length=64", "max_prompt_length=32", *extra])
    return diagnose(config, tok, prepare(config, tok))


def checks(result):
    return {f["check"]: f for f in result["findings"]}


CLEAN = [dict(p, id=f"ok{i}") for i, p in enumerate(PAIRS * 2)]
PITFALLS = {
    "prompt_in_response": {"prompt": "What is the capital of France?", "chosen": "What is the capital of France? Paris.", "rejected": "Green."},
    "identical_responses": {"prompt": "Add 2 and 3.", "chosen": "Same.", "rejected": "Same."},
    "empty_response": {"prompt": "Add 2 and 3.", "chosen": "", "rejected": "6"},
    "whitespace_only_difference": {"prompt": "Add 2 and 3.", "chosen": "The answer is 5.", "rejected": "The  answer is 5. "},
    "truncated_response": {"prompt": "Hello there!", "chosen": "The sky is blue. " * 20, "rejected": "No."},
}


@pytest.mark.parametrize("check", sorted(PITFALLS))
def test_each_pitfall_is_named(tok, tmp_path, check):
    path = write_jsonl(tmp_path / "d.jsonl", CLEAN + [dict(PITFALLS[check], id="bad")])
    result = inspect(tok, path, tmp_path, "data.test_size=0", "eval_on_start=false", "eval_steps=null")
    found = checks(result)
    assert found[check]["examples"] == ["bad"], result["findings"]
    assert set(found) == {check}  # the clean rows raise nothing
    assert found[check]["level"] == ("error" if check in ("prompt_in_response", "whitespace_only_difference") else "warning")


def test_templated_chosen_next_to_prompt_column_is_an_error_and_train_refuses(tok, tmp_path):
    rendered = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}], tokenize=False)
    path = write_jsonl(tmp_path / "d.jsonl", CLEAN + [{"prompt": "Add 2 and 3.", "chosen": rendered, "rejected": "6", "id": "tpl"}])
    config = load_config(None, [f"data.path={path}", "data.test_size=2", f"data.cache_dir={tmp_path}", "max_length=64", "max_prompt_length=32"])
    with pytest.raises(DataError, match="prompt_in_response: 1 rows, e.g. tpl"):
        load_checked(config, tok)
    train, _, _, report = load_checked(config.model_copy(update={"data": config.data.model_copy(update={"allow_errors": True})}), tok)
    assert len(train) == len(CLEAN) + 1 - 2 and report.findings[0]["check"] == "prompt_in_response"


def test_train_test_overlap_and_boundary_merge(tok, tmp_path):
    rows = [dict(p, id=f"r{i}") for i, p in enumerate(PAIRS * 4)]  # every prompt 4 times: the test split shares them
    found = checks(inspect(tok, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, "data.test_size=4"))
    assert "train_test_overlap" in found
    # A template whose generation header ends mid-word ("Th"): "Th" + "e answer" merges across the boundary.
    tok2 = make_tokenizer(chat=True)
    tok2.chat_template = "{% for m in messages %}{{ m['role'] + ':' + m['content'] + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:Th' }}{% endif %}"
    rows = [{"prompt": "Hi", "chosen": "The answer is 5.", "rejected": "The answer is 6.", "id": "merge"}] + CLEAN
    config = load_config(None, [f"data.path={write_jsonl(tmp_path / 'm.jsonl', rows)}", "data.test_size=0", "eval_on_start=false",
                                "eval_steps=null", f"data.cache_dir={tmp_path}", "max_length=64", "max_prompt_length=32"])
    found = checks(diagnose(config, tok2, prepare(config, tok2)))
    assert "merge" in found["boundary_merge"]["examples"] and found["boundary_merge"]["level"] == "warning"


def test_rendered_examples_mark_scored_tokens(tok, tmp_path):
    result = inspect(tok, write_jsonl(tmp_path / "d.jsonl", CLEAN), tmp_path)
    assert len(result["examples"]) == 3
    for ex in result["examples"]:
        assert ex["chosen"].count("[[") == 1 and ex["chosen"].endswith("<|im_end|>]]")
        assert ex["chosen"].split("[[")[0].endswith("<|im_start|>assistant\n")
    lengths = result["lengths"]["train"]
    assert set(lengths) >= {"prompt", "chosen", "rejected", "pair", "cut_at_max_length", "cut_at_max_prompt_length"}
    assert set(lengths["pair"]) == {"p50", "p90", "p99", "max"}


def test_second_run_reads_the_tokenized_cache(tok, tmp_path, monkeypatch):
    import orpo.data.pairs as data

    path = write_jsonl(tmp_path / "d.jsonl", CLEAN)
    first = inspect(tok, path, tmp_path)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and test
    calls = []
    monkeypatch.setattr(data, "tokenize_batch", lambda *a: calls.append(1) or pytest.fail("tokenized again"))
    second = inspect(tok, path, tmp_path)
    assert not calls and second["rows"] == first["rows"] and second["examples"] == first["examples"]
    monkeypatch.undo()
    changed = inspect(tok, path, tmp_path, "max_length=48")  # another setting: another key, tokenized afresh
    assert len(list((tmp_path / "cache").iterdir())) == 4 and changed["lengths"]["train"]["max_length"] == 48


def expected_hh():
    """Counts computed with plain json/gzip: rows, and pairs whose last chosen or rejected turn is empty."""
    rows = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    empty = sum(1 for r in rows if not r["chosen"].rsplit("\n\nAssistant:", 1)[1].strip() or not r["rejected"].rsplit("\n\nAssistant:", 1)[1].strip())
    return len(rows), empty


@pytest.mark.skipif(not HH.exists(), reason="shared data not present")
def test_hh_rlhf_inspect_counts(tok, tmp_path):
    n, empty = expected_hh()
    result = inspect(tok, HH, tmp_path, "data.test_size=0.1", "max_length=1024", "max_prompt_length=512")
    rows = result["rows"]
    assert rows["read"] == {str(HH): n} and rows["formats"] == {str(HH): "hh_rlhf"}
    assert rows["train_rows"] + rows["test_rows"] == n
    dropped = sum(v for k, v in rows["dropped"].items() if k.endswith("empty_response"))
    assert dropped == empty and rows["kept"]["train"] + rows["kept"]["test"] == n - empty
    assert set(rows["dropped"]) <= {"train/empty_response", "eval/empty_response"}
    assert result["errors"] == 0


@pytest.mark.skipif(not ORCA.exists(), reason="shared data not present")
def test_orca_openai_format_inspect_counts(tok, tmp_path):
    lines = [json.loads(line) for line in ORCA.read_text(encoding="utf-8").splitlines() if line.strip()]
    result = inspect(tok, ORCA, tmp_path, "data.test_size=0.1", "max_length=1024", "max_prompt_length=512")
    rows = result["rows"]
    assert rows["read"] == {str(ORCA): len(lines)} and rows["formats"] == {str(ORCA): "openai"}
    assert rows["kept"]["train"] + rows["kept"]["test"] == len(lines) and not rows["dropped"]
    systems = sum(1 for r in lines if r["input"]["messages"][0]["role"] == "system")
    assert systems == len(lines)
    # the system turn is kept (unless keep_end truncation cut it from a long prompt: tiny tokenizer, long texts)
    assert any("<|im_start|>system\n" in ex["chosen"] for ex in result["examples"])


@pytest.mark.skipif(not (HH.exists() and ORCA.exists()), reason="shared data not present")
def test_real_data_mixture_trains_a_few_steps(chat_model_dir, tmp_path):
    from orpo.training.loop import train

    mixture = f"[{{path: {HH}, num_samples: 24, max_length: 200}}, {{path: {ORCA}, num_samples: 12}}]"
    overrides = [f"model.name_or_path={chat_model_dir}", f"data.mixture={mixture}", "data.test_size=4", f"output_dir={tmp_path / 'run'}",
                 f"data.cache_dir={tmp_path / 'cache'}", "max_length=96", "max_prompt_length=48", "per_device_train_batch_size=2",
                 "max_steps=2", "logging_steps=1", "lora.r=4", "lora.alpha=8", "eval_on_start=false", "eval_steps=null"]
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 2 and summary["data"]["read"] == {str(HH): 2312, str(ORCA): 284}
    assert summary["data"]["train_pairs"] + summary["data"]["eval_pairs"] + sum(summary["data"]["dropped"].values()) == 36


def test_cli_data_inspect_json(chat_model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", CLEAN + [dict(PITFALLS["whitespace_only_difference"], id="ws")])
    code = main(["data", "inspect", f"model.name_or_path={chat_model_dir}", f"data.path={path}", "data.test_size=2",
                 f"data.cache_dir={tmp_path}", "max_length=64", "max_prompt_length=32", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and result["errors"] == 1 and result["findings"][0]["check"] == "whitespace_only_difference"
    assert main(["data", "inspect", f"model.name_or_path={chat_model_dir}", f"data.path={write_jsonl(tmp_path / 'c.jsonl', CLEAN)}",
                 "data.test_size=2", f"data.cache_dir={tmp_path}", "max_length=64", "max_prompt_length=32"]) == 0
    assert "findings: 0 errors" in capsys.readouterr().out
