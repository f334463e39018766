"""`orpo chat`: one-shot and interactive, tokens streamed, history kept, /reset and /exit."""

from __future__ import annotations

import io

from orpo.cli import main


def test_one_shot_prompt_streams_an_answer(chat_model_dir, capsys):
    assert main(["chat", str(chat_model_dir), "--prompt", "Hello there!", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()  # tiny random model: some text, streamed to stdout


def test_interactive_loop_keeps_history_and_resets(chat_model_dir, capsys, monkeypatch):
    from orpo import chat

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
    from orpo.runs import load, resolve

    model, _ = load(resolve(str(out)))
    assert type(model).__name__.startswith("Peft")
    assert main(["chat", str(out), "--prompt", "Add 2 and 3.", "--max-new-tokens", "3"]) == 0
