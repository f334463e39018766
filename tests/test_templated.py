"""data.templated: text the chat template rendered, read back into the messages it came from, exactly or not at all."""

from __future__ import annotations

import pytest

from conftest import CHATML, make_tokenizer
from orpo.data.formats import DataError
from orpo.data.templated import Untemplater

# SmolLM2's template: a default system message when the conversation has none.
DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 3's: a BOS, headers, trimmed contents, <|eot_id|> after every message.
LLAMA3 = (
    "{{ '<s>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d\n\ne"}],
]


def tokenizer_with(template: str):
    tok = make_tokenizer(chat=True)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [CHATML, DEFAULT_SYSTEM, LLAMA3], ids=["chatml", "default-system", "llama3"])
def test_rendered_conversations_and_prompts_read_back_to_what_renders_them(template):
    tok = tokenizer_with(template)
    reader = Untemplater(tok)
    assert reader.usable
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tokenize=False)
        back = reader.messages(text, "row")
        assert tok.apply_chat_template(back, tokenize=False) == text
        assert [m for m in back if m["role"] != "system"] == [m for m in messages if m["role"] != "system"]
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert reader.is_prompt(prompt) and reader.messages(prompt, "row", prompt=True)[-1] == messages[-2]


def test_the_seeds_rows_become_a_shared_prompt_and_two_responses_and_the_raw_prompt_goes():
    tok = tokenizer_with(CHATML)
    reader = Untemplater(tok)
    question = [{"role": "user", "content": "Name a colour."}]
    row = {"prompt": "Name a colour.",
           "chosen": tok.apply_chat_template(question + [{"role": "assistant", "content": "Blue."}], tokenize=False),
           "rejected": tok.apply_chat_template(question + [{"role": "assistant", "content": "Seven."}], tokenize=False)}
    out, layout = reader.row(row, "row 1")
    assert layout == "conversations" and "prompt" not in out
    assert out["chosen"] == question + [{"role": "assistant", "content": "Blue."}]
    # a rendered prompt with plain completions (the end-of-turn text after them is optional)
    prompt = tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    out, layout = reader.row({"prompt": prompt, "chosen": "Blue.<|im_end|>", "rejected": "Seven."}, "row 2")
    assert layout == "prompt" and out["prompt"] == question
    assert out["chosen"] == [{"role": "assistant", "content": "Blue."}] and out["rejected"] == [{"role": "assistant", "content": "Seven."}]
    plain = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
    assert reader.row(plain, "row 3") == (plain, None)


def test_rendered_rows_that_share_no_prompt_or_do_not_read_back_are_refused_in_one_line():
    tok = tokenizer_with(CHATML)
    reader = Untemplater(tok)
    one = tok.apply_chat_template([{"role": "user", "content": "A?"}, {"role": "assistant", "content": "a"}], tokenize=False)
    two = tok.apply_chat_template([{"role": "user", "content": "B?"}, {"role": "assistant", "content": "b"}], tokenize=False)
    with pytest.raises(DataError, match=r"^row 1: chosen and rejected are rendered conversations that share no prompt"):
        reader.row({"chosen": one, "rejected": two}, "row 1")
    with pytest.raises(DataError, match=r"^row 2\.chosen: looks rendered by the chat template, but could not be read back"):
        reader.row({"chosen": "junk <|im_start|>assistant\nx", "rejected": two}, "row 2")


def test_a_tokenizer_without_a_template_reads_nothing_back():
    reader = Untemplater(make_tokenizer(chat=False))
    assert not reader.usable
    row = {"prompt": "p", "chosen": "<|im_start|>assistant\nx", "rejected": "y"}
    assert reader.row(row, "row") == (row, None)
