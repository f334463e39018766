"""`orpo chat`: one-shot and interactive, tokens streamed, history kept, /reset and /exit."""

from __future__ import annotations

import io

from orpo.cli import main


def test_one_shot_prompt_streams_an_answer(chat_model_dir, capsys):
    assert main(["chat", str(chat_model_dir), "--prompt", "Hello there!", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()  # tiny random model: some text, streamed to stdout


def test_interactive_loop_keeps_history_and_resets(chat_model_dir, capsys, monkeypatch):
    from orpo.after import chat

    seen = []
    real = chat.reply

    def spy(model, tokenizer, messages, **kwargs):
        seen.append([m["content"] for m in messages])
        return real(model, tokenizer, messages, **kwargs)

    monkeypatch.setattr(chat, "reply", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there!\nAdd 2 and 3.\n/reset\nWhat colour is snow?\n/exit\n"))
    assert main(["chat", str(chat_model_dir), "--max-new-tokens", "3", "--temperature", "0.8", "--system", "Be brief."]) == 0
    assert [len(s) for s in seen] == [2, 4, 2]  # system + user; + reply + user; reset
    assert seen[2] == ["Be brief.", "What colour is snow?"]
    assert "assistant>" in capsys.readouterr().out


def test_chat_with_a_run_folder_uses_its_adapter(tmp_path, chat_model_dir, pairs_file, capsys):
    from conftest import tiny_overrides

    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(chat_model_dir, pairs_file, out, max_steps=1, eval_on_start="false", eval_steps="null")]) == 0
    from orpo.after.runs import load, resolve

    model, _ = load(resolve(str(out)))
    assert type(model).__name__.startswith("Peft")
    assert main(["chat", str(out), "--prompt", "Add 2 and 3.", "--max-new-tokens", "3"]) == 0


class EchoModel:
    """Stands in for a model in generate(): records the prompt ids it is given, answers end-of-turn."""

    def __init__(self, eos: int):
        from types import SimpleNamespace

        self.eos, self.seen, self.training, self.device = eos, [], False, "cpu"
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, attention_mask=None, **kwargs):
        import torch

        for row, mask in zip(input_ids, attention_mask, strict=True):
            self.seen.append(row[mask.bool()].tolist())  # without left padding
        return torch.cat([input_ids, torch.full((len(input_ids), 1), self.eos)], 1)


def test_every_prompt_path_feeds_the_ids_training_used(tmp_path):
    """A tokenizer that adds BOS with a template that does not write it (Llama 3 base under the ChatML set-up):
    task-accuracy generation and `orpo chat` give the model the prompt ids training used, BOS first."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from conftest import make_model_dir
    from orpo.after.chat import reply
    from orpo.config import load_config
    from orpo.data.pairs import token_spec, tokenize_batch
    from orpo.model.load import load_tokenizer
    from orpo.training.heldout import generate_replies

    folder = make_model_dir(tmp_path / "bos_model", chat=False)
    tok = AutoTokenizer.from_pretrained(folder)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(folder)
    config = load_config(None, [f"model.name_or_path={folder}"])
    tokenizer, _ = load_tokenizer(config)  # the ChatML set-up: the template writes no BOS
    bos = tokenizer.bos_token_id
    assert tokenizer("a")["input_ids"][0] == bos and "<s>" not in tokenizer.chat_template
    prompts = [[{"role": "user", "content": "Add 2 and 3."}], [{"role": "user", "content": "Hello there! How are you today?"}]]
    pairs = [{"prompt": p, "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]} for p in prompts]
    trained = [r["prompt_ids"] for r in tokenize_batch(pairs, tokenizer, token_spec(tokenizer, config))]
    assert all(ids[0] == bos and ids.count(bos) == 1 for ids in trained)

    model = EchoModel(tokenizer.eos_token_id)
    generate_replies(model, tokenizer, prompts, max_new_tokens=1, batch_size=2, device="cpu", show_progress=False)
    reply(model, tokenizer, prompts[1], max_new_tokens=1, temperature=0.0, top_p=1.0)
    assert model.seen == [trained[0], trained[1], trained[1]]
