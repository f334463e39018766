"""The Ollama Modelfile beside an exported GGUF: FROM, a TEMPLATE that writes the prompts the model's chat template
writes, the chat template's default system message as SYSTEM, and a stop for each end-of-turn token.

What Ollama hands a TEMPLATE (ollama's server/routes.go and template/template.go): when a conversation does not
start with a system message and the Modelfile has SYSTEM, a system message with that text is put first; then
`.Messages` is every message in order, system messages included (consecutive messages of one role merged into
one, their texts joined by a blank line), and `.System` is the text of the system messages. The TEMPLATE here
reads `.Messages` only, so a system message is written once, and SYSTEM gives a conversation without one the
chat template's own default (SmolLM2's "You are a helpful AI assistant named SmolLM, ..."), as in training. The
runtime puts BOS first where the GGUF says to (export writes add_bos = `bos_to_add(tokenizer) is not None`): the
TEMPLATE writes the BOS text only where it does not.

Formats (FORMATS): ChatML (SmolLM2, Qwen), Llama 3, and Gemma, whose chat template opens the first user turn with
the system text and a blank line instead of writing a system turn (Gemma 2's refuses a system message; the TEMPLATE
folds it in as Gemma 3's does). A TEMPLATE is written only once the chat template's prompts for PROBES (with and
without a system message, one turn and three) equal, string for string, what the TEMPLATE makes of them in Ollama
(`ollama_prompt`, tested against a Go-template renderer in tests/go_template.py). Still different: a message with
white space at either end (Llama 3's and Gemma's templates trim it; Ollama's template functions cannot), and two
messages of one role in a row (Ollama merges them).

A chat template of another format, or one that writes something else (Llama 3.1's dated system header), gets no
TEMPLATE and a comment line saying so. `ollama create` then takes the built-in template of Ollama's own whose Jinja
source is nearest the GGUF's chat template (edit distance under 100), if one is, with that template's stops; if
none is, Ollama 0.30 and later have llama.cpp's server render the GGUF's chat template itself, while earlier
versions used `{{ .Prompt }}` (the messages' text, no chat format).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.pairs import bos_to_add, end_of_turn_id


@dataclass(frozen=True)
class Format:
    """How a chat format writes one message: start + role name + after_role + content + end."""

    name: str
    start: str  # also what tells the format in a chat template
    after_role: str
    end: str
    stop: str  # its end-of-turn token
    names: dict[str, str] = field(default_factory=dict)  # role -> the name written, where they differ
    system_into_user: str | None = None  # set: no system turn; its text and this open the next turn


FORMATS = (
    Format("ChatML", "<|im_start|>", "\n", "<|im_end|>\n", "<|im_end|>"),
    Format("Llama 3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", "<|eot_id|>"),
    Format("Gemma", "<start_of_turn>", "\n", "<end_of_turn>\n", "<end_of_turn>", {"assistant": "model"}, "\n\n"),
)
SYSTEM, ASK, ANSWER, AGAIN = "Answer in one word.", "What is the capital of France?", "Paris.", "And of Italy?"
# Conversations the TEMPLATE must render as the chat template does before it is written.
PROBES = (
    [{"role": "user", "content": ASK}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}],
    [{"role": "user", "content": ASK}, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": AGAIN}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}, {"role": "assistant", "content": ANSWER},
     {"role": "user", "content": AGAIN}],
)


def modelfile(gguf_name: str, tokenizer) -> str:
    """The Modelfile text for `gguf_name` (a file beside it): FROM, TEMPLATE and SYSTEM where the chat template's
    format can be written exactly (else a comment saying why not), stops; no sampling parameters."""
    chat_template = tokenizer.chat_template or ""
    fmt = next((f for f in FORMATS if f.start in chat_template), None)
    lines = [f"FROM ./{gguf_name}"]
    if fmt is None:
        lines.append(f"# No TEMPLATE: the chat template is none of {', '.join(f.name for f in FORMATS)}; "
                     "Ollama picks its own template or uses the GGUF's chat template (orpo.after.modelfile).")
    else:
        system = default_system(tokenizer)
        lead, problem = leading_text(tokenizer, fmt, system)
        problem = problem or differs(tokenizer, fmt, lead, system)
        if problem:
            lines.append(f"# No TEMPLATE: {problem}; Ollama picks its own template or uses the GGUF's chat template "
                         "(orpo.after.modelfile).")
        else:
            lines.append(f'TEMPLATE """{template_text(fmt, lead)}"""')
            if system:
                lines.append(f'SYSTEM """{system}"""')
    eot = end_of_turn_id(tokenizer)
    stops = {f.stop for f in FORMATS if f.stop in chat_template}
    if eot is not None:
        stops.add(tokenizer.convert_ids_to_tokens(eot))
    lines += [f'PARAMETER stop "{s}"' for s in sorted(stops)]
    return "\n".join(lines) + "\n"


def template_text(fmt: Format, lead: str) -> str:
    """The Go template: `lead` (the BOS text where the runtime does not add BOS), every message of .Messages as a
    turn, then the assistant's header. The folded system text waits in $system until the next turn."""
    role = "{{ .Role }}"
    for name, written in fmt.names.items():
        role = '{{ if eq .Role "' + name + '" }}' + written + "{{ else }}" + role + "{{ end }}"
    turn = fmt.start + role + fmt.after_role
    header = fmt.start + fmt.names.get("assistant", "assistant") + fmt.after_role
    if fmt.system_into_user is None:
        return lead + "{{ range .Messages }}" + turn + "{{ .Content }}" + fmt.end + "{{ end }}" + header
    return (lead + '{{ $system := "" }}{{ $held := false }}{{ range .Messages }}'
            '{{ if eq .Role "system" }}{{ $system = .Content }}{{ $held = true }}{{ else }}'
            + turn + "{{ if $held }}{{ $system }}" + fmt.system_into_user + "{{ end }}{{ .Content }}" + fmt.end
            + "{{ $held = false }}{{ end }}{{ end }}" + header)


def ollama_prompt(fmt: Format, lead: str, system: str | None, messages: list[dict[str, str]]) -> str:
    """The prompt Ollama makes of `messages` with TEMPLATE `template_text(fmt, lead)` and SYSTEM `system`."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    out, held = lead, ""
    for m in messages:
        if fmt.system_into_user is not None and m["role"] == "system":
            held = m["content"] + fmt.system_into_user
            continue
        out += fmt.start + fmt.names.get(m["role"], m["role"]) + fmt.after_role + held + m["content"] + fmt.end
        held = ""
    return out + fmt.start + fmt.names.get("assistant", "assistant") + fmt.after_role


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat template's prompt as the runtime is to see it: without the BOS text where the runtime adds BOS."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos_to_add(tokenizer) is not None and bos and text.startswith(bos):
        return text[len(bos):]
    return text


def default_system(tokenizer) -> str | None:
    """The system message the chat template writes when a conversation has none: what stands, in the prompt of a
    conversation without one, where a conversation with one has its text. None when there is none (or it is empty:
    Ollama ignores an empty SYSTEM)."""
    from jinja2 import TemplateError

    try:
        with_system = chat_prompt(tokenizer, PROBES[1])
    except TemplateError:  # the template refuses system messages (Gemma 2): no default either
        return None
    without = chat_prompt(tokenizer, PROBES[0])
    before, found, after = with_system.partition(SYSTEM)
    if not found or len(without) < len(before) + len(after) or not (without.startswith(before) and without.endswith(after)):
        return None
    return without[len(before):len(without) - len(after)] or None


def leading_text(tokenizer, fmt: Format, system: str | None) -> tuple[str, str | None]:
    """(the text the chat template writes before the first turn, such as a BOS the runtime does not add; a problem
    or None)."""
    want, turns = chat_prompt(tokenizer, PROBES[0]), ollama_prompt(fmt, "", system, PROBES[0])
    if not want.endswith(turns):
        return "", f"the chat template's prompt for one user message is not {fmt.name} turns an Ollama template can write"
    lead = want[:len(want) - len(turns)]
    return lead, ("the chat template writes {{ before the first turn, which Go would read as an action" if "{{" in lead else None)


def differs(tokenizer, fmt: Format, lead: str, system: str | None) -> str | None:
    """Which probe conversation the TEMPLATE would render otherwise than the chat template, or None."""
    from jinja2 import TemplateError

    if '"""' in lead + (system or ""):
        return 'the chat template writes """, which a Modelfile cannot quote'
    for messages in PROBES:
        roles = "/".join(m["role"] for m in messages)
        try:
            want = chat_prompt(tokenizer, messages)
        except TemplateError as exc:
            if messages[0]["role"] == "system":  # refused (Gemma 2): no prompt for Ollama's to differ from
                continue
            return f"the chat template fails on {roles} ({exc})"
        if ollama_prompt(fmt, lead, system, messages) != want:
            return f"the chat template's prompt for {roles} differs from the {fmt.name} turns an Ollama template writes"
    return None
