"""The Ollama Modelfile: its TEMPLATE and SYSTEM, rendered as Ollama renders them (tests/go_template.py, with the
values Ollama passes), give string for string the chat template's prompt, without the BOS text the runtime adds;
for SmolLM2's tokenizer, a plain ChatML one, and Llama 3 and Gemma 2/3 ones built offline around their published
chat templates. A template the module cannot write gets none, and says so."""

from __future__ import annotations

import pytest

from conftest import CORPUS, make_tokenizer
from go_template import Message, render
from orpo.after.modelfile import modelfile
from orpo.data.pairs import bos_to_add

# The chat templates as published in the models' tokenizer_config.json (Meta-Llama-3-8B-Instruct, gemma-2-2b-it,
# gemma-3-270m-it).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
# The part of Llama 3.1's template that no Ollama template of ours writes: a dated header in every system turn.
LLAMA31_SYSTEM = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: 26 Jul 2024\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
TURNS = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another one?"}]
CONVERSATIONS = {
    "one turn": TURNS[:1],
    "several turns": TURNS,
    "system, one turn": [SYSTEM, *TURNS[:1]],
    "system, several turns": [SYSTEM, *TURNS],
    "empty system": [{"role": "system", "content": ""}, *TURNS[:1]],
}


def tokenizer_for(chat_template: str, specials: list[str], bos: str, eos: str, adds_bos: bool):
    """A byte-level BPE tokenizer on the test corpus with a real model's special tokens and chat template; with
    `adds_bos`, BOS is put first as Llama 3's and Gemma's tokenizers do (a post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (bos, eos)]})
    fast.chat_template = chat_template
    return fast


def llama3(template: str = LLAMA3):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return tokenizer_for(template, specials, "<|begin_of_text|>", "<|eot_id|>", adds_bos=True)


def gemma(template: str = GEMMA3, adds_bos: bool = True):
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    return tokenizer_for(template, specials, "<bos>", "<eos>", adds_bos=adds_bos)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from orpo.model.builtin import builtin_model_dir

    return AutoTokenizer.from_pretrained(builtin_model_dir())


def modelfile_parts(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM, the stops and the comments of a Modelfile, read as Ollama's parser
    (parser/parser.go) reads them: a command's value runs to the first new line at which what was read, white
    space trimmed, is complete: bare, "quoted", or in three double quotes (the quotes then dropped, nothing else);
    a line that starts with # is a comment."""
    parts: dict = {"stop": [], "comments": []}
    lines = text.split("\n")
    while lines:
        line = lines.pop(0)
        if line.startswith("#"):
            parts["comments"].append(line[1:].strip())
            continue
        if not line.strip():
            continue
        name, value = line.split(" ", 1)
        if name == "PARAMETER":
            name, value = value.split(" ", 1)
        while not complete(value.strip()):
            value += "\n" + lines.pop(0)
        value = value.strip()
        value = value[3:-3] if value.startswith('"""') else value[1:-1] if value.startswith('"') else value
        if name == "stop":
            parts["stop"].append(value)
        else:
            parts[name] = value
    return parts


def complete(value: str) -> bool:
    if value.startswith('"""'):
        return len(value) >= 6 and value.endswith('"""')
    return not value.startswith('"') or (len(value) >= 2 and value.endswith('"'))


def ollama_values(messages: list[dict], system: str | None) -> dict:
    """What Ollama's chat endpoint hands the template (server/routes.go, template/template.go): SYSTEM as a first
    message when the conversation does not start with one; .Messages all of them, system ones included; .System
    their text; consecutive messages of one role merged (joined by a blank line)."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    merged: list[dict] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"] and m["role"] != "tool":
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    return {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
            "Messages": [Message(m["role"], m["content"]) for m in merged], "Response": ""}


def ollama_prompt(text: str, messages: list[dict]) -> str:
    parts = modelfile_parts(text)
    return render(parts["TEMPLATE"], ollama_values(messages, parts.get("SYSTEM")))


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """What the chat template gives, without the BOS text when the runtime adds BOS (the GGUF's add_bos)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if bos_to_add(tokenizer) is not None:
        assert text.startswith(tokenizer.bos_token)
        text = text[len(tokenizer.bos_token):]
    return text


# ---------------------------------------------------------------- the renderer, on Go facts worked out by hand


def test_the_renderer_trims_where_go_does():
    """`{{- ` eats every space, tab and new line before it, ` -}}` every one after it; without the dash nothing
    goes, and `{{-3}}` is the number -3, no trim marker."""
    assert render("a \n\t {{- .X -}} \n b", {"X": "x"}) == "axb"
    assert render("a \n{{ .X }}\n b", {"X": "x"}) == "a \nx\n b"
    assert render("a {{-3}} b", {}) == "a -3 b"
    assert render("{{/* a comment */}}a{{- /* trimmed */ -}} b", {}) == "ab"


def test_the_renderer_branches_and_ranges_as_go():
    """if/else if/else on eq; truth (empty string and list false); and/or return the deciding argument; range sets
    the dot, `$` stays the top; range's else runs on an empty list; a variable set in a range is seen after it;
    a missing top-level key is nil (`<no value>`, missingkey=zero)."""
    branch = '{{ if eq .X "a" }}A{{ else if eq .X "b" "c" }}BC{{ else }}other{{ end }}'
    assert [render(branch, {"X": x}) for x in ("a", "b", "c", "d")] == ["A", "BC", "BC", "other"]
    assert render('{{ if .S }}yes{{ else }}no{{ end }}{{ if .L }}yes{{ else }}no{{ end }}', {"S": "", "L": []}) == "nono"
    assert render('[{{ and "x" "" "y" }}][{{ or "" "y" }}][{{ not "" }}][{{ and 1 2 }}]', {}) == "[][y][true][2]"
    messages = [Message("user", "hi"), Message("assistant", "yo")]
    assert render("{{ range .Messages }}{{ .Role }}={{ .Content }}/{{ $.S }};{{ end }}", {"Messages": messages, "S": "s"}) \
        == "user=hi/s;assistant=yo/s;"
    assert render("{{ range $i, $m := .Messages }}{{ $i }}{{ $m.Role }}{{ end }}", {"Messages": messages}) == "0user1assistant"
    assert render("{{ range .L }}x{{ else }}empty{{ end }}", {"L": []}) == "empty"
    assert render('{{ $last := "" }}{{ range .Messages }}{{ $last = .Content }}{{ end }}{{ $last }}', {"Messages": messages}) == "yo"
    assert render('{{ .Missing }}|{{ len .Messages }}|{{ if and (eq (len .Messages) 2) (not .Missing) }}two{{ end }}',
                  {"Messages": messages}) == "<no value>|2|two"
    with pytest.raises(AssertionError, match="field Nope"):
        render("{{ range .Messages }}{{ .Nope }}{{ end }}", {"Messages": messages})


def test_ollama_values_put_system_first_and_keep_it_in_the_messages():
    values = ollama_values(TURNS[:1], "default")
    assert values["System"] == "default" and [m.values["Role"] for m in values["Messages"]] == ["system", "user"]
    values = ollama_values([SYSTEM, *TURNS[:1]], "default")  # the conversation's own system message wins
    assert values["System"] == SYSTEM["content"] and values["Messages"][0].values["Content"] == SYSTEM["content"]
    assert ollama_values(TURNS[:1], None)["System"] == "" and len(ollama_values(TURNS[:1], None)["Messages"]) == 1


# ---------------------------------------------------------------- the Modelfile


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", ["smollm2", "chatml", "llama3", "gemma3", "gemma3-no-bos"])
def test_the_template_renders_what_the_chat_template_renders(name, conversation, smollm2):
    tokenizer = {"smollm2": lambda: smollm2, "chatml": lambda: make_tokenizer(chat=True), "llama3": llama3,
                 "gemma3": gemma, "gemma3-no-bos": lambda: gemma(adds_bos=False)}[name]()
    text = modelfile("m.gguf", tokenizer)
    messages = CONVERSATIONS[conversation]
    assert ollama_prompt(text, messages) == chat_prompt(tokenizer, messages)


def test_smollm2_gets_its_default_system_message_once(smollm2):
    """SmolLM2's template adds its system message when there is none: SYSTEM says it, and the prompt has it once
    (Ollama hands the template both .System and a system message in .Messages)."""
    text = modelfile("m.gguf", smollm2)
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert modelfile_parts(text)["SYSTEM"] == default
    for messages in CONVERSATIONS.values():
        prompt = ollama_prompt(text, messages)
        assert prompt.count("<|im_start|>system") == 1 and prompt.count(default) == (messages[0]["role"] != "system")
    assert "SYSTEM" not in modelfile("m.gguf", make_tokenizer(chat=True))  # plain ChatML: no default, no SYSTEM


@pytest.mark.parametrize("name", ["llama3", "gemma3", "gemma2"])
def test_one_bos_where_the_runtime_adds_it(name):
    """Llama 3's and Gemma's tokenizers add BOS (the GGUF says add_bos): the TEMPLATE writes none, so the prompt
    has exactly one."""
    tokenizer = {"llama3": llama3, "gemma3": gemma, "gemma2": lambda: gemma(GEMMA2)}[name]()
    assert bos_to_add(tokenizer) is not None
    bos = tokenizer.bos_token
    template = modelfile_parts(modelfile("m.gguf", tokenizer))["TEMPLATE"]
    assert bos not in template
    ids = [bos_to_add(tokenizer)] + tokenizer(ollama_prompt(modelfile("m.gguf", tokenizer), TURNS), add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1


def test_the_bos_text_is_written_where_the_runtime_adds_none():
    tokenizer = gemma(adds_bos=False)
    assert bos_to_add(tokenizer) is None and modelfile_parts(modelfile("m.gguf", tokenizer))["TEMPLATE"].startswith("<bos>{{")


@pytest.mark.parametrize("conversation", ["one turn", "several turns"])
def test_gemma2_refuses_a_system_message_and_the_template_folds_it_in(conversation):
    """Gemma 2's template refuses a system message: the conversations it takes match; a system message goes into
    the first user turn as Gemma 3's template puts it."""
    tokenizer = gemma(GEMMA2)
    text = modelfile("m.gguf", tokenizer)
    assert ollama_prompt(text, CONVERSATIONS[conversation]) == chat_prompt(tokenizer, CONVERSATIONS[conversation])
    assert ollama_prompt(text, [SYSTEM, *TURNS[:1]]) == chat_prompt(gemma(), [SYSTEM, *TURNS[:1]])


@pytest.mark.parametrize("name, stops", [("smollm2", ["<|im_end|>"]), ("llama3", ["<|eot_id|>"]),
                                         ("gemma3", ["<end_of_turn>"])])
def test_the_modelfile_names_the_file_and_each_end_of_turn_token(name, stops, smollm2):
    tokenizer = {"smollm2": smollm2, "llama3": llama3(), "gemma3": gemma()}[name]
    parts = modelfile_parts(modelfile("model.q8_0.gguf", tokenizer))
    assert parts["FROM"] == "./model.q8_0.gguf" and parts["stop"] == stops and not parts["comments"]
    assert "temperature" not in modelfile("m.gguf", tokenizer)


def test_a_template_it_cannot_write_gets_a_comment_and_no_template():
    """Llama 3.1's dated system header is not a Llama 3 turn: no TEMPLATE (nor SYSTEM), one comment line that
    says which prompt differs; a format it does not know at all: the same, with the stop still written."""
    text = modelfile("m.gguf", llama3(LLAMA31_SYSTEM))
    parts = modelfile_parts(text)
    assert "TEMPLATE" not in parts and "SYSTEM" not in parts and parts["stop"] == ["<|eot_id|>"]
    assert len(parts["comments"]) == 1 and parts["comments"][0].startswith("No TEMPLATE: the chat template's prompt for system/user")
    tokenizer = make_tokenizer(chat=True)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]<|im_end|>{% endfor %}"
    parts = modelfile_parts(modelfile("m.gguf", tokenizer))
    assert "TEMPLATE" not in parts and parts["stop"] == ["<|im_end|>"]
    assert parts["comments"][0].startswith("No TEMPLATE: the chat template is none of ChatML, Llama 3, Gemma")
