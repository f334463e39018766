"""orpo.trainer: TRL's names on orpo's loop. The seed's script runs as written (with `from orpo import ...`), its
merge cell rebuilds the trained model, it agrees with TRL 1.16's own ORPOTrainer, and bad input gets one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PAIRS, make_model_dir
from orpo import ORPOConfig, ORPOTrainer, setup_chat_format
from orpo.config import ConfigError
from orpo.data.formats import DataError

SEED_TARGETS = ["up_proj", "down_proj", "gate_proj", "k_proj", "q_proj", "v_proj", "o_proj"]


def base(path, tied=False):
    """A tiny base model without a chat template (its vocabulary lacks ChatML's tokens), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_model_dir(path, chat=False, tied=tied) if not (path / "config.json").is_file() else path
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def conversations(rows=PAIRS * 2):
    return [{"prompt": r["prompt"], "chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]} for r in rows]


def seed_map(rows, tokenizer):
    """The seed's format_chat_template: chosen and rejected rendered whole; the raw prompt column stays."""
    return [dict(r, chosen=tokenizer.apply_chat_template(r["chosen"], tokenize=False),
                 rejected=tokenizer.apply_chat_template(r["rejected"], tokenize=False)) for r in rows]


def seed_args(out, **extra):
    """The seed's ORPOConfig, sized for a tiny model on a CPU."""
    args = dict(learning_rate=1e-3, beta=0.1, lr_scheduler_type="linear", max_length=64, max_prompt_length=32,
                per_device_train_batch_size=2, per_device_eval_batch_size=2, gradient_accumulation_steps=2,
                optim="adamw_torch", num_train_epochs=1, evaluation_strategy="steps", eval_steps=0.5, logging_steps=1,
                warmup_steps=1, report_to="none", output_dir=str(out), gradient_checkpointing=False)
    return ORPOConfig(**{**args, **extra})


def lora(dropout=0.05):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM", target_modules=SEED_TARGETS)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_seeds_merge_cell_rebuilds_the_trained_model(tmp_path, tied):
    """setup_chat_format adds ChatML's rows to a base that lacks them; after training, the seed's merge cell (base
    reloaded, setup_chat_format again, PeftModel.from_pretrained, merge_and_unload) gives the trained model's
    logits within 1e-4 of the largest: the added rows are the trained ones, not new random draws."""
    from peft import PeftModel

    model, tokenizer = base(tmp_path / "base", tied)
    model, tokenizer = setup_chat_format(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0 and tokenizer.eos_token == "<|im_end|>"
    rows = seed_map(conversations(), tokenizer)
    trainer = ORPOTrainer(model=model, args=seed_args(tmp_path / "results"), train_dataset=rows[:9], eval_dataset=rows[9:],
                          peft_config=lora(), tokenizer=tokenizer)
    output = trainer.train()
    assert output.global_step == 3 and output.training_loss == pytest.approx(output.metrics["train_loss"])
    trainer.save_model(tmp_path / "new_model")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = trainer.model.eval()(input_ids=ids).logits  # (1, T, V)
    del trainer, model
    model, tokenizer = base(tmp_path / "base", tied)
    model, tokenizer = setup_chat_format(model, tokenizer)
    merged = PeftModel.from_pretrained(model, tmp_path / "new_model").merge_and_unload().eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert float((want - got).abs().max()) <= 1e-4 * float(want.abs().max())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        moved = (merged.get_input_embeddings().weight[im_end] - base(tmp_path / "base", tied)[0].get_input_embeddings().weight.mean(0)).abs().max()
    assert float(moved) > 0  # the <|im_end|> row trained (it started as the mean of the old rows)


def test_the_trainers_surface_is_trls(tmp_path, monkeypatch):
    """TrainOutput, eval_-prefixed metrics, state.log_history with loss lines and eval lines, callbacks' on_log and
    on_evaluate, the run folder as orpo train leaves it, the settings read back by their TRL names, and
    push_to_hub uploading what `orpo push` does (the network replaced)."""
    from transformers import TrainerCallback

    seen = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(("log", state.global_step, dict(logs)))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(("evaluate", state.global_step, dict(metrics)))

    model, tokenizer = base(tmp_path / "base")
    model, tokenizer = setup_chat_format(model, tokenizer)
    args = seed_args(tmp_path / "results")
    assert (args.learning_rate, args.max_prompt_length, args.eval_steps, args.report_to) == (1e-3, 32, 0.5, [])
    trainer = ORPOTrainer(model=model, args=args, train_dataset=seed_map(conversations(), tokenizer)[:9],
                          eval_dataset=seed_map(conversations(), tokenizer)[9:], peft_config=lora(), processing_class=tokenizer,
                          callbacks=[Record])
    before = trainer.evaluate()
    assert {"eval_loss", "eval_nll_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_log_odds_ratio",
            "eval_log_odds_chosen", "eval_runtime", "eval_samples_per_second", "epoch"} <= set(before)
    trainer.train()
    history = trainer.state.log_history
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "learning_rate", "grad_norm"} <= set(history[1])
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 2, 3] and "train_runtime" in history[-1]
    assert [s for kind, s, _ in seen if kind == "evaluate"] == [0, 2, 3] and len([1 for kind, *_ in seen if kind == "log"]) == 6
    folder = tmp_path / "results"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final", "report.html"} <= {p.name for p in folder.iterdir()}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["after"]["loss"] == pytest.approx(history[-2]["eval_loss"])
    uploads = []
    monkeypatch.setattr("orpo.after.push.hub_token", lambda: "token")
    monkeypatch.setattr("orpo.after.push.push_folder", lambda staged, repo, private: uploads.append(
        (sorted(p.name for p in staged.iterdir()), repo, private)) or f"https://huggingface.co/{repo}")
    assert trainer.push_to_hub() == "https://huggingface.co/results"  # TRL's default repo: the output folder's name
    assert uploads[0][1:] == ("results", False) and {"README.md", "adapter_model.safetensors"} <= set(uploads[0][0])


def test_rendered_rows_and_message_rows_give_the_same_tokens_and_metrics(tmp_path):
    """The seed's rows (chosen/rejected rendered whole, a raw prompt column) are read back into messages: the
    same token ids and the same pre-training eval metrics as the rows given as message lists."""
    model, tokenizer = base(tmp_path / "base")
    model, tokenizer = setup_chat_format(model, tokenizer)
    results = []
    for name, rows in (("messages", conversations()), ("rendered", seed_map(conversations(), tokenizer))):
        trainer = ORPOTrainer(model=model, args=seed_args(tmp_path / name), train_dataset=rows[:9], eval_dataset=rows[9:],
                              peft_config=lora(), tokenizer=tokenizer)
        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
        results.append(([[r[c] for c in columns] for r in trainer.train_dataset], trainer.evaluate()))
        model = trainer.model.unload()  # the same base for the second trainer
    (ids_a, eval_a), (ids_b, eval_b) = results
    assert ids_a == ids_b
    assert {k: v for k, v in eval_a.items() if "runtime" not in k and "per_second" not in k} == \
        {k: v for k, v in eval_b.items() if "runtime" not in k and "per_second" not in k}


def test_the_same_script_agrees_with_trl_1_16s_orpo_trainer(tmp_path):
    """The seed's script through TRL 1.16's experimental ORPOTrainer and through orpo's, on the same tiny model:
    the first logged loss and the pre-training eval metrics agree within 1e-4 (plain layout; orpo's NLL over prompt
    and response, as TRL's). TRL gets the rows in the form it tokenizes correctly (a rendered prompt and completions
    ending at <|im_end|>); orpo gets the seed's rows. One micro-batch holds the whole split, so both see the same
    pairs at step 1 whatever order their samplers draw."""
    import warnings

    from trl.experimental.orpo import ORPOConfig as TRLConfig
    from trl.experimental.orpo import ORPOTrainer as TRLTrainer

    model, tokenizer = base(tmp_path / "base")
    model, tokenizer = setup_chat_format(model, tokenizer)
    rows = conversations(PAIRS)
    common = dict(learning_rate=1e-3, beta=0.1, max_length=64, per_device_train_batch_size=4, per_device_eval_batch_size=2,
                  gradient_accumulation_steps=1, max_steps=1, logging_steps=1, report_to="none", bf16=False,
                  gradient_checkpointing=False, optim="adamw_torch", seed=0)
    trl_rows = [{"prompt": tokenizer.apply_chat_template(r["chosen"][:1], tokenize=False, add_generation_prompt=True),
                 "chosen": r["chosen"][1]["content"] + "<|im_end|>", "rejected": r["rejected"][1]["content"] + "<|im_end|>"} for r in rows]
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TRLTrainer(model=model, args=TRLConfig(output_dir=str(tmp_path / "trl"), **common), train_dataset=Dataset.from_list(trl_rows[:4]),
                            eval_dataset=Dataset.from_list(trl_rows[4:]), processing_class=tokenizer, peft_config=lora(dropout=0.0))
        trl_eval = theirs.evaluate()
        theirs.train()
    trl_loss = next(e["loss"] for e in theirs.state.log_history if "loss" in e)
    model = theirs.model.unload()
    ours = ORPOTrainer(model=model, args=ORPOConfig(output_dir=str(tmp_path / "orpo"), layout="plain", max_prompt_length=32, **common),
                       train_dataset=seed_map(rows, tokenizer)[:4], eval_dataset=seed_map(rows, tokenizer)[4:], peft_config=lora(dropout=0.0),
                       tokenizer=tokenizer)
    our_eval = ours.evaluate()
    ours.train()
    our_loss = next(e["loss"] for e in ours.state.log_history if "loss" in e)
    assert our_loss == pytest.approx(trl_loss, abs=1e-4)
    shared = ["eval_loss", "eval_nll_loss", "eval_log_odds_ratio", "eval_log_odds_chosen", "eval_rewards/chosen",
              "eval_rewards/rejected", "eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen", "eval_logps/rejected"]
    assert {k: our_eval[k] for k in shared} == pytest.approx({k: trl_eval[k] for k in shared}, abs=1e-4)


def test_bad_input_gets_one_clear_exception_each(tmp_path):
    from peft import get_peft_model

    model, tokenizer = base(tmp_path / "base")
    args = seed_args(tmp_path / "out")
    with pytest.raises(ConfigError, match="the tokenizer has no chat template.*setup_chat_format"):
        ORPOTrainer(model=model, args=args, train_dataset=conversations(), tokenizer=tokenizer, peft_config=lora())
    model, tokenizer = setup_chat_format(model, tokenizer)
    with pytest.raises(DataError, match=r"train_dataset row 1: missing field 'chosen' \(columns: answer, question\)"):
        ORPOTrainer(model=model, args=args, train_dataset=[{"question": "q", "answer": "a"}], tokenizer=tokenizer, peft_config=lora())
    rendered = seed_map(conversations(), tokenizer)
    mixed = [dict(rendered[0], rejected=rendered[1]["rejected"])]  # two different prompts
    with pytest.raises(DataError, match="train_dataset row 1: chosen and rejected are rendered conversations that share no prompt"):
        ORPOTrainer(model=model, args=args, train_dataset=mixed, tokenizer=tokenizer, peft_config=lora())
    with pytest.raises(ConfigError, match="already a PeftModel and peft_config is given"):
        ORPOTrainer(model=get_peft_model(model, lora()), args=args, train_dataset=rendered, tokenizer=tokenizer, peft_config=lora())
    with torch.device("meta"):
        from transformers import AutoConfig, AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "base"))
    with pytest.raises(ConfigError, match="weights on the meta device"):
        ORPOTrainer(model=meta, args=args, train_dataset=rendered, tokenizer=tokenizer, peft_config=lora())
    with pytest.raises(ConfigError, match="data_collator: orpo builds its own batches"):
        ORPOTrainer(model=model, args=args, train_dataset=rendered, tokenizer=tokenizer, data_collator=lambda rows: rows)
    with pytest.raises(ConfigError, match="push_to_hub_token .*a TRL key.* has no meaning in orpo"):
        ORPOConfig(push_to_hub_token="x")
    assert not (tmp_path / "out").exists()  # nothing written by a refused trainer


def test_trl_keys_port_the_defaults_pass_and_each_other_value_says_what_to_use(tmp_path):
    """Every key of TRL 1.16's ORPOConfig (TrainingArguments' included) and the seed's dropped ones: set to TRL's
    default it is accepted; set to something else it is orpo's setting, mapped, or one line naming the key."""
    import dataclasses

    from trl.experimental.orpo import ORPOConfig as TRLConfig

    from orpo.trl_names import RENAMED

    accepted = ORPOConfig(max_prompt_length=512, evaluation_strategy="steps", eval_steps=0.2, trust_remote_code=True,
                          push_to_hub=False, dataloader_num_workers=0, output_dir=str(tmp_path))
    assert accepted.max_prompt_length == 512 and accepted.config.model.trust_remote_code is True
    for field in dataclasses.fields(TRLConfig):
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        if field.name == "output_dir" or default is dataclasses.MISSING:
            continue
        ORPOConfig(**{field.name: default}) if field.name not in ("bf16",) else None  # TRL's own default: accepted
        other = (not default) if isinstance(default, bool) else "something-else" if isinstance(default, str) else 7
        try:
            ORPOConfig(**{field.name: other})
        except ConfigError as exc:
            named = RENAMED.get(field.name, field.name).split(".")[-1]
            assert named in str(exc) and "\n" not in str(exc).strip(), (field.name, str(exc))
