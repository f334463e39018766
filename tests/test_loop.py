"""End to end on tiny models: files written, exact resume, QLoRA, 8-bit optimizers, ChatML set-up, recipe."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides as overrides
from conftest import write_jsonl
from orpo.cli import main
from orpo.config import load_config
from orpo.training.checkpoint import list_checkpoints, resolve_checkpoint
from orpo.training.loop import train
from orpo.training.optim import make_scheduler

TRAIN_KEYS = {
    "loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
    "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "learning_rate",
    "grad_norm", "tokens_per_second", "seconds_per_step",
}


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_run_writes_everything_and_final_adapter_loads(chat_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *overrides(chat_model_dir, pairs_file, out, eval_steps=2)]) == 0
    assert "preference accuracy" in capsys.readouterr().out
    lines = read_metrics(out)
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3]
    assert TRAIN_KEYS <= set(train_lines[0]) and all(math.isfinite(m["loss"]) for m in train_lines)
    eval_steps = [m["step"] for m in lines if "eval_loss" in m]
    assert eval_steps == [0, 2, 3]  # before, every 2 steps, at the end
    summary = json.loads((out / "summary.json").read_text())
    assert {"rewards/accuracies", "loss", "nll_loss"} <= set(summary["before"]) <= set(summary["after"])
    assert summary["data"]["train_pairs"] == 20 and summary["data"]["eval_pairs"] == 4
    assert load_config(out / "config.yaml").max_steps == 3

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.chat_template and model.peft_config["default"].r == 4
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there!"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.isfinite(model(**ids).logits).all()


def test_gradient_accumulation_and_bad_data_do_not_break_the_run(chat_model_dir, tmp_path):
    rows = [
        {"prompt": "Hello there! " * 50, "chosen": "How are you today?", "rejected": "I am fine."},  # over-long prompt
        {"prompt": "Add 2 and 3.", "chosen": "", "rejected": "6"},  # empty response: dropped
    ] + [{"prompt": "Add 2 and 3.", "chosen": "The answer is 5.", "rejected": "The answer is 6."}] * 9
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    summary = train(load_config(None, overrides(chat_model_dir, data, tmp_path / "run", gradient_accumulation_steps=2, **{"data.test_size": 2})))
    assert summary["data"]["dropped"] == {"train/empty_response": 1} or summary["data"]["dropped"] == {"eval/empty_response": 1}
    assert all(math.isfinite(m.get("loss", 0.0)) for m in read_metrics(tmp_path / "run"))


def test_resume_reproduces_the_uninterrupted_run_exactly(chat_model_dir, pairs_file, tmp_path):
    common = dict(max_steps=6, save_steps=3, gradient_accumulation_steps=2, save_total_limit=5, **{"lora.dropout": 0.1})
    full = tmp_path / "full"
    train(load_config(None, overrides(chat_model_dir, pairs_file, full, **common)))
    assert [p.name for p in list_checkpoints(full)] == ["checkpoint-3"]

    # A second run that "stopped" after step 3: it has the checkpoint, plus debris of an interrupted save.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    (resumed / ".checkpoint-5.partial").mkdir()
    (resumed / "checkpoint-4").mkdir()  # no COMPLETE marker: never chosen
    assert resolve_checkpoint(resumed, "latest").name == "checkpoint-3"
    train(load_config(None, overrides(chat_model_dir, pairs_file, resumed, resume_from_checkpoint="latest", **common)))

    a = load_file(str(full / "final" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda out: {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}  # noqa: E731
    assert {s: v for s, v in losses(full).items() if s > 3} == losses(resumed)


@pytest.mark.parametrize("extra", [{}, {"lora.enabled": "false", "max_tokens_per_batch": 40}], ids=["lora", "full-ft-small-passes"])
def test_packed_and_plain_runs_log_the_same_numbers(chat_model_dir, pairs_file, tmp_path, extra):
    """Same config but the layout (dropout off, so both compute one function): every logged metric at every
    step, the held-out metrics and the trained weights agree (1e-5). The step takes the same pairs."""
    common = dict(max_steps=3, gradient_accumulation_steps=2, eval_steps=2, **{"lora.dropout": 0.0}, **extra)
    runs = {}
    for layout in ("plain", "packed"):
        out = tmp_path / layout
        train(load_config(None, overrides(chat_model_dir, pairs_file, out, layout=layout, **common)))
        runs[layout] = (read_metrics(out), out)
    (plain, plain_out), (packed, packed_out) = runs["plain"], runs["packed"]
    assert [m["step"] for m in plain] == [m["step"] for m in packed] and len(plain) == 6
    for a, b in zip(plain, packed, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"tokens_per_second", "seconds_per_step", "step"}:
            assert b[key] == (None if a[key] is None else pytest.approx(a[key], rel=1e-5, abs=1e-6)), (a["step"], key)
    name = "adapter_model.safetensors" if not extra else "model.safetensors"
    a, b = load_file(plain_out / "final" / name), load_file(packed_out / "final" / name)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_qlora_runs_a_few_steps(wide_model_dir, pairs_file, tmp_path):
    cfg = load_config(None, overrides(wide_model_dir, pairs_file, tmp_path / "q", max_steps=2, **{
        "model.load_in_4bit": "true", "model.bnb_4bit_compute_dtype": "float32", "optim": "paged_adamw_8bit"}))
    from orpo.model.load import load_model, load_tokenizer

    tokenizer, new = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, new)
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    summary = train(cfg)
    assert math.isfinite(summary["after"]["loss"])


@pytest.mark.parametrize("optim", ["adamw_8bit", "adamw_torch"])
def test_optimizers_and_gradient_checkpointing(chat_model_dir, pairs_file, tmp_path, optim):
    summary = train(load_config(None, overrides(chat_model_dir, pairs_file, tmp_path / optim, optim=optim, gradient_checkpointing="true", max_steps=2)))
    assert summary["after"]["loss"] < summary["before"]["loss"]


def test_full_finetuning_saves_a_plain_model(chat_model_dir, pairs_file, tmp_path):
    out = tmp_path / "full_ft"
    train(load_config(None, overrides(chat_model_dir, pairs_file, out, max_steps=1, **{"lora.enabled": "false"})))
    from transformers import AutoModelForCausalLM

    assert (out / "final" / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_chatml_setup_on_a_base_model(base_model_dir, pairs_file, tmp_path):
    """No template: ChatML tokens are added, embeddings resized, and the new rows train and are saved."""
    out = tmp_path / "chatml"
    cfg = load_config(None, overrides(base_model_dir, pairs_file, out, max_steps=2, learning_rate=0.05))
    from orpo.model.load import load_model, load_tokenizer

    tokenizer, new_ids = load_tokenizer(cfg)
    assert len(new_ids) == 2 and tokenizer.convert_ids_to_tokens(new_ids) == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer.eos_token == "<|im_end|>"
    model = load_model(cfg, tokenizer, new_ids)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    before = model.get_input_embeddings().weight[new_ids].detach().clone()
    head_before = model.get_output_embeddings().weight[new_ids].detach().clone()
    old_row = model.get_input_embeddings().weight[5].detach().clone()
    train(cfg)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "final")
    assert "<|im_start|>" in saved.chat_template
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    base.resize_token_embeddings(len(saved))
    loaded = PeftModel.from_pretrained(base, out / "final")
    after = loaded.get_input_embeddings()(torch.tensor(new_ids)).detach()
    assert not torch.allclose(after, before)  # the new rows were trained and came back from the adapter
    hidden = torch.randn(1, base.config.hidden_size)
    assert not torch.allclose(loaded.get_output_embeddings()(hidden)[0, new_ids], hidden @ head_before.T)  # untied head too
    assert torch.equal(loaded.get_input_embeddings()(torch.tensor([5])).detach()[0], old_row)
    from peft import AutoPeftModelForCausalLM

    auto = AutoPeftModelForCausalLM.from_pretrained(out / "final")  # resizes the base from the saved tokenizer
    assert torch.equal(auto.get_input_embeddings()(torch.tensor(new_ids)).detach(), after)
    adapter_bytes = (out / "final" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < base.get_input_embeddings().weight.numel() * 4  # not the whole embedding matrix


@pytest.mark.parametrize(("kind", "lr_at_warmup_end", "lr_at_end"), [("linear", 1.0, 0.0), ("cosine", 1.0, 0.0), ("constant", 1.0, 1.0), ("inverse_sqrt", 1.0, math.sqrt(2 / 10))])
def test_schedules(kind, lr_at_warmup_end, lr_at_end):
    cfg = load_config(None, [f"lr_scheduler_type={kind}", "warmup_steps=2", "learning_rate=1.0"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(cfg, opt, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(lr_at_warmup_end)
    assert sched.get_last_lr()[0] == pytest.approx(lr_at_end, abs=1e-6)


def test_reference_recipe_runs_two_steps_on_tiny_stand_ins(wide_model_dir, tmp_path):
    """recipes/llama3-8b-orpo-qlora.yaml with the model and dataset swapped for local tiny ones."""
    rows = []
    for i in range(12):
        q = f"Add {i} and 3."
        rows.append({
            "source": "tiny", "prompt": q, "question": q,
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {i + 3}."}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {i + 4}."}],
        })
    data = write_jsonl(tmp_path / "mix.jsonl", rows)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "llama3-8b-orpo-qlora.yaml"
    cfg = load_config(recipe, [
        f"model.name_or_path={wide_model_dir}", f"data.path={data}", f"output_dir={tmp_path / 'ref'}",
        "max_steps=2", "bf16=false", "model.dtype=float32", "model.bnb_4bit_compute_dtype=float32",
        "model.attn_implementation=eager", "data.test_size=2", "max_length=96", "max_prompt_length=48",
    ])
    assert cfg.model.load_in_4bit and cfg.optim == "paged_adamw_8bit" and cfg.learning_rate == 8e-6
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.warmup_steps) == (2, 4, 10)
    with warnings.catch_warnings():  # gradient checkpointing states use_reentrant (a future torch raises without it)
        warnings.filterwarnings("error", message=".*use_reentrant.*")
        summary = train(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["after"]["loss"])


def test_tensorboard_tracker_gets_the_metrics(chat_model_dir, pairs_file, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    train(load_config(None, overrides(chat_model_dir, pairs_file, out, max_steps=2, report_to="tensorboard")))
    events = list(out.rglob("events.out.tfevents*"))
    assert events and sum(e.stat().st_size for e in events) > 200
    assert (out / "metrics.jsonl").is_file()


def test_separate_eval_file_and_own_template_requirement(chat_model_dir, base_model_dir, pairs_file, tmp_path):
    from conftest import PAIRS
    from orpo.model.load import load_tokenizer

    eval_file = write_jsonl(tmp_path / "eval.jsonl", PAIRS[:3])
    summary = train(load_config(None, overrides(chat_model_dir, pairs_file, tmp_path / "ev", max_steps=1, **{"data.eval_path": eval_file})))
    assert (summary["data"]["train_pairs"], summary["data"]["eval_pairs"]) == (24, 3)
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(load_config(None, overrides(base_model_dir, pairs_file, tmp_path / "x", **{"model.chat_template": "own"})))


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (which Python's json writes and reads by default)."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_a_non_finite_loss_stops_the_run_naming_the_step(chat_model_dir, pairs_file, tmp_path, capsys):
    """lr=1e30 blows the weights up; a later step's loss is NaN: exit 1 with one line naming that step, no final/
    and no summary.json, metrics.jsonl strict JSON, the checkpoints saved before it finite."""
    out = tmp_path / "run"
    code = main(["train", *overrides(chat_model_dir, pairs_file, out, learning_rate=1e30, max_steps=5, save_steps=1,
                                     eval_steps="null", **{"lora.dropout": 0.0})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    stopped = re.fullmatch(r"orpo: error: step (\d+): loss \S+, gradient norm \S+: not finite\. Training stopped .*", err[-1])
    assert stopped and int(stopped[1]) >= 2, err
    last = f"checkpoint-{int(stopped[1]) - 1}"
    assert f"the last checkpoint is {last}" in err[-1]
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    assert list_checkpoints(out)[-1].name == last
    for path in list_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in load_file(str(path / "trainable.safetensors")).values())
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def test_skipping_non_finite_steps_counts_them_and_saves_finite_json(chat_model_dir, pairs_file, tmp_path):
    """on_nonfinite=skip: the run finishes, the skipped steps are counted, every file is strict JSON (the NaN
    after-eval metrics become null) and the final weights are finite."""
    out = tmp_path / "run"
    summary = train(load_config(None, overrides(chat_model_dir, pairs_file, out, learning_rate=1e30, max_steps=4,
                                                on_nonfinite="skip", eval_steps="null", **{"lora.dropout": 0.0})))
    assert summary["skipped_steps"] == 3  # step 1 applied (weights ~1e30), steps 2-4 NaN
    saved = strict_json((out / "summary.json").read_text())
    assert saved["skipped_steps"] == 3 and saved["after"]["loss"] is None
    lines = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in lines if "skipped_steps" in m] == [0, 1, 2, 3]
    weights = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_one_epoch_visits_every_pair_once(chat_model_dir, tmp_path, monkeypatch):
    """26 training pairs, batch 2, GA 4, 1 epoch: 13 micro-batches in 4 steps (the last holds 1), every pair once,
    logged epoch 1.0 at the end."""
    import orpo.training.loop as loop

    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."} for i in range(30)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    seen = []
    stream = loop.micro_batch_stream

    def recording(sampler, dataset, start):
        for group in stream(sampler, dataset, start):
            seen.append([tuple(r["chosen_ids"]) for r in group])
            yield group

    monkeypatch.setattr(loop, "micro_batch_stream", recording)
    out = tmp_path / "run"
    summary = train(load_config(None, overrides(chat_model_dir, data, out, max_steps=-1, num_train_epochs=1, gradient_accumulation_steps=4,
                                                eval_steps="null", eval_on_start=False, **{"data.test_size": 4})))
    assert summary["data"]["train_pairs"] == 26 and summary["total_steps"] == summary["steps"] == 4
    visited = [pair for group in seen for pair in group]
    assert len(seen) == 13 and len(visited) == 26 == len(set(visited))
    assert [m["epoch"] for m in read_metrics(out) if "epoch" in m][-1] == 1.0


def test_a_full_disk_leaves_no_half_written_final(chat_model_dir, pairs_file, tmp_path, monkeypatch, capsys):
    """The disk fills while final/ is written: one line saying so, exit 1, no final/ and no .partial left."""
    import errno

    from transformers import PreTrainedTokenizerBase

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    out = tmp_path / "run"
    assert main(["train", *overrides(chat_model_dir, pairs_file, out, max_steps=1, eval_steps="null", eval_on_start=False)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"orpo: error: could not write {out / 'final'}: the disk is full (nothing half-written was left)"
    assert not (out / "final").exists() and not list(out.glob(".*partial")) and not (out / "summary.json").exists()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_an_output_dir_that_cannot_be_used_gets_one_line(chat_model_dir, pairs_file, tmp_path, capsys, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker if where == "file" else blocker / "run"
    assert main(["train", *overrides(chat_model_dir, pairs_file, out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"orpo: error: output_dir {out} ")


def test_a_new_run_into_a_used_output_dir_is_refused_unless_overwritten(chat_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = overrides(chat_model_dir, pairs_file, out, max_steps=2, eval_steps="null")
    assert main(["train", *args]) == 0
    assert main(["train", *args]) == 1
    assert "is not empty (config.yaml, eval_before.json, final, metrics.jsonl, ...): resume its run" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(["train", *args, "max_steps=3", "overwrite_output_dir=true"]) == 0
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == [1, 2, 3] and (out / "notes.txt").read_text() == "mine"  # the old run's log is gone, not the user's file


def test_resume_logs_each_step_once(chat_model_dir, pairs_file, tmp_path):
    """A run killed after step 5 (checkpoint at 3) resumes: metrics.jsonl drops the killed run's steps 4-5 and
    ends equal to the uninterrupted run's (times aside)."""
    common = dict(max_steps=6, save_steps=3, eval_steps=2, save_total_limit=5)
    full = tmp_path / "full"
    train(load_config(None, overrides(chat_model_dir, pairs_file, full, **common)))
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(full / "checkpoint-3", killed / "checkpoint-3")
    shutil.copy(full / "config.yaml", killed / "config.yaml")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(line for line in lines if json.loads(line)["step"] <= 5) + '\n{"step": 6, "lo')
    train(load_config(None, overrides(chat_model_dir, pairs_file, killed, resume_from_checkpoint="latest", **common)))
    strip = lambda out: [{k: v for k, v in m.items() if k not in ("time", "tokens_per_second", "seconds_per_step")} for m in read_metrics(out)]  # noqa: E731
    assert strip(killed) == strip(full)


def test_resume_refuses_other_settings_and_allows_what_cannot_change_the_result(chat_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = overrides(chat_model_dir, pairs_file, out, max_steps=4, save_steps=2, eval_steps="null")
    assert main(["train", *args]) == 0
    code = main(["train", *args, "resume_from_checkpoint=latest", "learning_rate=1e-4", "data.test_size=6"])
    err = capsys.readouterr().err
    assert code == 2 and "data.test_size: 4.0 -> 6.0; learning_rate: 0.001 -> 0.0001" in err
    assert load_config(out / "config.yaml").learning_rate == 1e-3  # the run's config.yaml is untouched
    assert main(["train", *args, "resume_from_checkpoint=latest", "max_steps=6", "logging_steps=2", "overwrite_output_dir=true"]) == 0
    assert max(m["step"] for m in read_metrics(out)) == 6


def test_a_tracker_that_is_not_installed_is_a_config_error(chat_model_dir, pairs_file, tmp_path, monkeypatch, capsys):
    import importlib.util

    import orpo.training.tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(orpo.training.tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    assert main(["train", *overrides(chat_model_dir, pairs_file, out, report_to="wandb")]) == 2
    assert "report_to=wandb: the wandb package is not installed (pip install wandb" in capsys.readouterr().err
    assert not out.exists()


def test_a_seeded_run_repeats_with_a_cold_or_warm_data_cache(chat_model_dir, pairs_file, tmp_path):
    """Same config and seed, the tokenized-data cache cold then warm: every logged number equal to the last digit
    (dropout on, so LoRA's init and masks must come from the same random stream)."""
    common = dict(max_steps=4, gradient_accumulation_steps=2, eval_steps=2, **{"lora.dropout": 0.1, "data.cache_dir": str(tmp_path / "cache")})
    runs = []
    for name in ("cold", "warm"):
        train(load_config(None, overrides(chat_model_dir, pairs_file, tmp_path / name, **common)))
        runs.append([{k: v for k, v in m.items() if k not in ("time", "tokens_per_second", "seconds_per_step")} for m in read_metrics(tmp_path / name)])
    assert any((tmp_path / "cache").iterdir()) and runs[0] == runs[1]
