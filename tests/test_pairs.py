"""Data pipeline: formats, the prompt/response boundary on token ids, truncation, drops, batching."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from conftest import CHATML, PAIRS, make_tokenizer, write_jsonl
from orpo.config import load_config
from orpo.data.pairs import (
    IGNORE,
    DataError,
    PairSampler,
    TokenSpec,
    collate,
    end_of_turn_id,
    read_rows,
    sample_and_split,
    to_messages,
    token_spec,
    tokenize_batch,
    tokenize_pair,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat=True)


def spec_for(tok, max_length=256, max_prompt_length=128, keep_end=True):
    return TokenSpec(None, end_of_turn_id(tok), max_length, max_prompt_length, keep_end)


def pair(prompt, chosen, rejected):
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def test_response_tokens_are_exactly_the_reply_and_one_end_of_turn(tok):
    out = tokenize_pair(pair("Add 2 and 3.", "The answer is 5.", "The answer is 6."), tok, spec_for(tok))
    assert out["drop"] == ""
    assert tok.decode(out["prompt_ids"]) == "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(out["chosen_ids"]) == "The answer is 5.<|im_end|>"
    assert tok.decode(out["rejected_ids"]) == "The answer is 6.<|im_end|>"
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert out["chosen_ids"].count(eot) == 1 and out["chosen_ids"][-1] == eot


def test_implicit_prompt_is_shared_at_message_level_not_character_prefix(tok):
    row = {
        "chosen": [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "The sky is blue."}],
        "rejected": [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "The sky is green."}],
    }
    msgs = to_messages(row)
    assert msgs["prompt"] == [{"role": "user", "content": "What colour is the sky?"}]
    assert msgs["chosen"] == [{"role": "assistant", "content": "The sky is blue."}]
    out = tokenize_pair(msgs, tok, spec_for(tok))
    assert tok.decode(out["chosen_ids"]) == "The sky is blue.<|im_end|>"
    assert tok.decode(out["rejected_ids"]) == "The sky is green.<|im_end|>"


def test_orpo_dpo_mix_layout_does_not_repeat_the_question(tok):
    """orpo-dpo-mix-40k: a prompt string next to chosen/rejected lists that already hold the user turn."""
    row = {
        "source": "x",
        "prompt": "Add 2 and 3.",
        "question": "Add 2 and 3.",
        "chosen": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "The answer is 5."}],
        "rejected": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "The answer is 6."}],
    }
    out = tokenize_pair(to_messages(row), tok, spec_for(tok))
    assert tok.decode(out["prompt_ids"]).count("Add 2 and 3.") == 1
    assert "user" not in tok.decode(out["chosen_ids"])


def test_multi_turn_shared_history_goes_to_the_prompt(tok):
    history = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "How are you today?"},
        {"role": "user", "content": "Add 2 and 3."},
    ]
    row = {"chosen": history + [{"role": "assistant", "content": "5"}], "rejected": history + [{"role": "assistant", "content": "6"}]}
    msgs = to_messages(row)
    assert msgs["prompt"] == history
    out = tokenize_pair(msgs, tok, spec_for(tok))
    assert tok.decode(out["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tok.decode(out["chosen_ids"]) == "5<|im_end|>"


def bos_tokenizer(template: str):
    """A tokenizer that adds <s> by default, with the given template."""
    from tokenizers.processors import TemplateProcessing

    tok = make_tokenizer(chat=True)
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.chat_template = template
    return tok, bos


@pytest.mark.parametrize("template_writes_bos", [True, False])
def test_exactly_one_bos(template_writes_bos):
    tok, bos = bos_tokenizer(("{{ '<s>' }}" if template_writes_bos else "") + CHATML)
    cfg = load_config(None, ["max_length=256", "max_prompt_length=128"])
    spec = token_spec(tok, cfg)
    assert spec.bos_id == bos
    out = tokenize_pair(pair("Hello there!", "How are you today?", "I am fine."), tok, spec)
    full = out["prompt_ids"] + out["chosen_ids"]
    assert full[0] == bos and full.count(bos) == 1


def test_template_without_end_of_turn_special_gets_one_appended():
    tok = make_tokenizer(chat=True)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    assert end_of_turn_id(tok) == tok.eos_token_id
    out = tokenize_pair(pair("Hello there!", "How are you today?", "I am fine."), tok, spec_for(tok))
    assert out["chosen_ids"][-1] == tok.eos_token_id and out["chosen_ids"].count(tok.eos_token_id) == 1


def test_long_prompt_keeps_its_end_and_pair_fits(tok):
    long_prompt = "Hello there! " * 60 + "Add 2 and 3."
    spec = spec_for(tok, max_length=40, max_prompt_length=24)
    out = tokenize_pair(pair(long_prompt, "The answer is 5. " * 10, "The answer is 6."), tok, spec)
    assert out["drop"] == ""
    assert len(out["prompt_ids"]) == 24
    assert tok.decode(out["prompt_ids"]).endswith("Add 2 and 3.<|im_end|>\n<|im_start|>assistant\n")
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) == 40
    assert len(out["prompt_ids"]) + len(out["rejected_ids"]) <= 40


def test_keep_start_truncation(tok):
    out = tokenize_pair(pair("Hello there! " * 60, "5", "6"), tok, spec_for(tok, 40, 24, keep_end=False))
    assert tok.decode(out["prompt_ids"]).startswith("<|im_start|>user\nHello")
    assert len(out["prompt_ids"]) == 24


@pytest.mark.parametrize(("chosen", "rejected", "reason"), [("", "No.", "empty_response"), ("  ", "No.", "empty_response"), ("Same.", "Same.", "identical_responses")])
def test_bad_pairs_are_dropped_with_a_reason(tok, chosen, rejected, reason):
    assert tokenize_pair(pair("Hello there!", chosen, rejected), tok, spec_for(tok))["drop"] == reason


def test_collate_layout(tok):
    records = [tokenize_pair(pair(p["prompt"], p["chosen"], p["rejected"]), tok, spec_for(tok)) for p in PAIRS[:3]]
    batch = collate(records, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for i, r in enumerate(records):
        for row, side in ((i, "chosen_ids"), (i + 3, "rejected_ids")):
            n_prompt, n = len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r[side])
            assert batch["input_ids"][row, :n].tolist() == r["prompt_ids"] + r[side]
            assert (batch["labels"][row, :n_prompt] == IGNORE).all()
            assert batch["labels"][row, n_prompt:n].tolist() == r[side]
            assert (batch["labels"][row, n:] == IGNORE).all() and (batch["attention_mask"][row, n:] == 0).all()
            assert batch["attention_mask"][row, :n].all()


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_read_file_formats(tmp_path, kind):
    path = tmp_path / f"pairs.{kind}"
    frame = pd.DataFrame(PAIRS)
    if kind == "jsonl":
        write_jsonl(path, PAIRS)
    elif kind == "json":
        path.write_text(json.dumps(PAIRS))
    elif kind == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    rows = read_rows(str(path))
    assert len(rows) == len(PAIRS) and rows[1]["chosen"] == PAIRS[1]["chosen"]


def test_read_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(str(tmp_path / "x.txt"))


def test_row_errors_name_the_field():
    with pytest.raises(DataError, match="missing field 'rejected'"):
        to_messages({"prompt": "a", "chosen": "b"}, where="row 3")
    with pytest.raises(DataError, match=r"row 3.chosen\[0\].*'role' and 'content'"):
        to_messages({"prompt": "a", "chosen": [{"content": "b"}], "rejected": "c"}, where="row 3")
    with pytest.raises(DataError, match="no prompt"):
        to_messages({"chosen": "b", "rejected": "c"})


def test_sample_and_split_is_deterministic(tmp_path):
    rows = read_rows(str(write_jsonl(tmp_path / "p.jsonl", [dict(p, id=str(i)) for i, p in enumerate(PAIRS * 10)])))
    cfg = load_config(None, ["data.path=x.jsonl", "data.num_samples=30", "data.test_size=0.2"]).data
    train, test = sample_and_split(rows, cfg)
    assert (len(train), len(test)) == (24, 6)
    again_train, again_test = sample_and_split(rows, cfg)
    assert train["id"] == again_train["id"] and test["id"] == again_test["id"]
    assert not set(train["id"]) & set(test["id"])


def test_sampler_resumes_mid_epoch_and_shards():
    sampler = PairSampler(10, 3, seed=1)
    full = list(sampler.epoch(0))
    assert [len(b) for b in full] == [3, 3, 3, 1]
    assert sorted(i for b in full for i in b) == list(range(10))
    assert list(sampler.epoch(0, offset=2)) == full[2:]
    assert list(sampler.epoch(1)) != full
    shards = [list(PairSampler(10, 2, seed=1, rank=r, world=2).epoch(0)) for r in range(2)]
    assert [len(b) for b in shards[0]] == [2, 2, 1] and [len(b) for b in shards[1]] == [2, 2, 1]
    assert sorted(i for s in shards for b in s for i in b) == list(range(10))  # nothing dropped or repeated
    assert torch.equal(torch.tensor(full[0][:2]), torch.tensor(shards[0][0]))


@pytest.mark.parametrize("rows,batch,world", [(10, 2, 2), (7, 2, 3), (5, 4, 4), (1, 1, 2), (12, 3, 4)])
def test_sampler_shards_cover_every_pair_once(rows, batch, world):
    """Every pair exactly once per epoch over the ranks, the same number of batches on each, none over
    `batch`, and each global batch the one process's batch of batch x world pairs holds."""
    shards = [list(PairSampler(rows, batch, seed=3, rank=r, world=world).epoch(2)) for r in range(world)]
    single = list(PairSampler(rows, batch * world, seed=3).epoch(2))
    assert all(len(s) == len(single) for s in shards)
    assert sorted(i for s in shards for b in s for i in b) == list(range(rows))
    assert all(len(b) <= batch for s in shards for b in s)
    for k, whole in enumerate(single):
        assert [i for s in shards for i in s[k]] == whole


def test_dataset_folders_and_hub_names(tmp_path, monkeypatch):
    import datasets

    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "saved"))
    assert len(read_rows(str(tmp_path / "saved"))) == len(PAIRS)
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "part-0.jsonl", PAIRS)
    assert len(read_rows(str(tmp_path / "folder"))) == len(PAIRS)

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "hub rows")
    assert read_rows("mlabonne/orpo-dpo-mix-40k", None, "train") == "hub rows"
    assert calls == [(("mlabonne/orpo-dpo-mix-40k", None), {"split": "train"})]


def test_a_folder_is_read_whole_or_refused_with_a_list(tmp_path):
    """Every file of a folder is read (two .jsonl parts: all rows); files of several kinds are refused with the
    list; a folder with no data files is named (not 'No task.toml or instruction.md files found')."""
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", PAIRS)
    write_jsonl(folder / "part-1.jsonl", PAIRS[:2])
    (folder / "notes.md").write_text("not data")
    assert len(read_rows(str(folder))) == len(PAIRS) + 2
    pd.DataFrame(PAIRS).to_csv(folder / "extra.csv", index=False)
    pd.DataFrame(PAIRS).to_parquet(folder / "extra.parquet")
    with pytest.raises(DataError, match=r"holds data files of several kinds \(csv: extra.csv; json: part-0.jsonl, part-1.jsonl; parquet: extra.parquet\)"):
        read_rows(str(folder))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'nothing'}: no data files in this folder"):
        read_rows(str(tmp_path / "nothing"))


def test_fuzz_data_rows_fail_in_one_line_and_write_nothing(chat_model_dir, tmp_path_factory):
    """Good rows plus one row with a random field broken (null, a number, a list of junk, a missing field...):
    either the row is acceptable, or `orpo train` exits non-zero, its last line naming the file and the row's
    line and field, no traceback, nothing written to output_dir."""
    import contextlib
    import io

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from conftest import tiny_overrides
    from orpo.cli import main

    junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=6),
                     st.lists(st.one_of(st.integers(), st.text(max_size=3), st.dictionaries(st.sampled_from(["role", "content", "x"]), st.one_of(st.text(max_size=5), st.integers(), st.none()), max_size=3)), max_size=3),
                     st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))

    @given(field=st.sampled_from(["prompt", "chosen", "rejected"]), value=junk, missing=st.booleans(), at=st.integers(0, 11))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    def check(field, value, missing, at):
        folder = tmp_path_factory.mktemp("rows")
        rows = [dict(p) for p in PAIRS * 2]
        if missing:
            del rows[at][field]
        else:
            rows[at][field] = value
        data = write_jsonl(folder / "pairs.jsonl", rows)
        out = folder / "run"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["train", *tiny_overrides(chat_model_dir, data, out, max_steps=1, eval_on_start=False, eval_steps="null")])
        if code == 0:
            return  # an acceptable row (e.g. a string where a string goes)
        last = err.getvalue().strip().splitlines()[-1]
        assert code in (1, 2) and last.startswith("orpo: ") and "Traceback" not in err.getvalue()
        assert f"pairs.jsonl line {at + 1}" in last and field in last, last
        assert not out.exists()

    check()


def test_a_huge_row_is_cut_before_tokenizing(tok, monkeypatch):
    """A 20 MB response: the tokenizer never sees more than max_length x 256 characters of it, and the kept ids
    equal those of the uncut text's start."""
    spec = spec_for(tok, 64, 32)
    huge = "The answer is 5. " * 1_200_000
    pair = {"prompt": [{"role": "user", "content": "Add 2 and 3."}], "chosen": [{"role": "assistant", "content": huge}],
            "rejected": [{"role": "assistant", "content": "The answer is 6."}]}
    seen = []
    original = type(tok).__call__

    def spy(self, texts, *args, **kwargs):
        seen.extend(len(t) for t in texts)
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", spy)
    [row] = tokenize_batch([pair], tok, spec)
    assert max(seen) < 64 * 256 + 200 and row["response_cut"]
    small = dict(pair, chosen=[{"role": "assistant", "content": huge[:5000]}])
    assert row["chosen_ids"] == tokenize_batch([small], tok, spec)[0]["chosen_ids"]


def test_broken_csv_quoting_and_null_fields_are_named(tmp_path):
    bad = tmp_path / "pairs.csv"
    bad.write_text('prompt,chosen,rejected\n"Add 2 and 3.","5","6"\n"Hello,"fine,"bad\n')
    with pytest.raises(DataError, match=r"pairs.csv: could not be read as csv: a quoted field is never closed"):
        read_rows(str(bad))
    from orpo.data.formats import canonical

    with pytest.raises(DataError, match="line 2: field 'chosen' is null"):
        canonical({"prompt": "Hi", "chosen": None, "rejected": "x"}, "auto", "pairs.jsonl line 2")
