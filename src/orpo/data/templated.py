"""Rows whose text the chat template already rendered, read back into message lists with the same template.

Two layouts are recognised, row by row:
- whole conversations (the seed notebook's map): `chosen` and `rejected` are `apply_chat_template(messages)` of
  the full conversations, `prompt` is a raw string or absent. Both are read back into message lists; the prompt
  is then the messages they share, which is their common text up to the last assistant header. A raw `prompt`
  column is not used (putting it in front again would score the question as part of the answer, as TRL did);
- a templated prompt: `prompt` ends with the assistant header (`add_generation_prompt=True`), `chosen` and
  `rejected` are the completions, with or without the end-of-turn text after them.

Reading back is exact or refused: the messages found must render to the very same text with the template, so
their token ids are those of the same rows given as message lists (data.pairs tokenizes either the same way).

How the template is read: it renders a few probe conversations whose contents are marker words; the text around
the markers gives each separator (what comes before the first message, between a user message and the next
assistant message, and so on). A text is then cut at those separators, and the cut is checked by rendering.
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import DataError

_MARK = "ORPOMARK{}X"  # marker contents: plain words, so templates that trim or escape leave them alone


@dataclass(frozen=True)
class _Form:
    """The separators of one conversation shape: `start` before the first message (with a system message or
    without), `after_system`, `user_to_assistant`, `assistant_to_user`, and `end` after the last assistant message."""

    system: bool
    start: str
    after_system: str
    user_to_assistant: str
    assistant_to_user: str
    end: str


def _pieces(text: str, count: int) -> list[str]:
    """`text` cut at the markers 0..count-1: count + 1 pieces, or [] when a marker is missing or out of order."""
    pieces, rest = [], text
    for i in range(count):
        head, sep, rest = rest.partition(_MARK.format(i))
        if not sep:
            return []
        pieces.append(head)
    return pieces + [rest]


class Untemplater:
    """Reads text rendered by `tokenizer`'s chat template back into messages (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        m = [_MARK.format(i) for i in range(5)]
        user, assistant, system = ({"role": r, "content": c} for r, c in (("user", m[1]), ("assistant", m[2]), ("system", m[0])))
        self.header = ""
        self.forms: list[_Form] = []
        try:
            plain = _pieces(self.render([{"role": "user", "content": m[0]}, {"role": "assistant", "content": m[1]},
                                         {"role": "user", "content": m[2]}, {"role": "assistant", "content": m[3]}]), 4)
            with_system = _pieces(self.render([system, user, assistant]), 3)
            asked = self.render([{"role": "user", "content": m[0]}], generation=True)
            bare = self.render([{"role": "user", "content": m[0]}])
        except Exception:  # noqa: BLE001 - no template, or one that refuses these shapes: nothing is read back
            return
        if asked.startswith(bare) and len(asked) > len(bare):
            self.header = asked[len(bare):]  # the assistant header the generation prompt adds
        if plain:
            self.forms.append(_Form(False, plain[0], "", plain[1], plain[2], plain[4]))
        if with_system and plain:
            self.forms.append(_Form(True, with_system[0], with_system[1], plain[1], plain[2], plain[4]))

    def render(self, messages: list[dict[str, str]], generation: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    @property
    def usable(self) -> bool:
        return bool(self.header and self.forms)

    def is_conversation(self, text) -> bool:
        """`text` looks like a whole rendered conversation: it holds the assistant header."""
        return self.usable and isinstance(text, str) and self.header.strip() in text

    def is_prompt(self, text) -> bool:
        """`text` looks like a rendered prompt: it ends with the assistant header."""
        return self.usable and isinstance(text, str) and text.endswith(self.header) and len(text) > len(self.header)

    def _cut(self, text: str, form: _Form, prompt: bool) -> list[dict[str, str]] | None:
        """`text` cut at `form`'s separators into messages (the first occurrence of each: contents never hold a
        separator), or None when it does not fit; the caller checks the cut by rendering it."""
        if not text.startswith(form.start):
            return None
        pos, messages = len(form.start), []
        role = "system" if form.system else "user"
        while True:
            if role == "assistant" and form.assistant_to_user not in text[pos:]:  # the conversation's last message
                if prompt or not text.endswith(form.end) or len(text) - len(form.end) < pos:
                    return None
                messages.append({"role": role, "content": text[pos: len(text) - len(form.end)]})
                return messages
            sep = {"system": form.after_system, "user": form.user_to_assistant, "assistant": form.assistant_to_user}[role]
            at = text.find(sep, pos) if sep else -1
            if at < 0:
                return None
            messages.append({"role": role, "content": text[pos:at]})
            pos = at + len(sep)
            if prompt and role == "user" and pos == len(text):  # a prompt ends with the assistant header
                return messages
            role = "assistant" if role == "user" else "user"

    def messages(self, text: str, where: str, prompt: bool = False) -> list[dict[str, str]]:
        """The messages whose rendering is `text` (with the generation header when `prompt`); DataError if none."""
        for form in self.forms:
            found = self._cut(text, form, prompt)
            if found and self.render(found, generation=prompt) == text:
                return found
        what = "prompt (ending with the assistant header)" if prompt else "conversation"
        raise DataError(f"{where}: looks rendered by the chat template, but could not be read back as a {what} with this "
                        "tokenizer's template; give the messages as lists instead of rendering them yourself")

    def row(self, row: dict, where: str) -> tuple[dict, str | None]:
        """(the row with templated text read back into messages, the layout found or None)."""
        chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
        if self.is_conversation(chosen) and self.is_conversation(rejected) and not self.is_prompt(prompt):
            good = self.messages(chosen, f"{where}.chosen")
            bad = self.messages(rejected, f"{where}.rejected")
            shared = 0
            while shared < min(len(good), len(bad)) - 1 and good[shared] == bad[shared]:
                shared += 1
            if shared == 0:
                raise DataError(f"{where}: chosen and rejected are rendered conversations that share no prompt (their "
                                "text differs before the first assistant header)")
            out = {k: v for k, v in row.items() if k != "prompt"}
            return {**out, "chosen": good, "rejected": bad}, "conversations"
        if self.is_prompt(prompt) and isinstance(chosen, str) and isinstance(rejected, str):
            messages = self.messages(prompt, f"{where}.prompt", prompt=True)
            return {**row, "prompt": messages, "chosen": self._completion(chosen), "rejected": self._completion(rejected)}, "prompt"
        return row, None

    def _completion(self, text: str) -> list[dict[str, str]]:
        """A completion after a rendered prompt, without what the template writes after an assistant message."""
        end = self.forms[0].end
        for tail in (end, end.rstrip(), self.tokenizer.eos_token or ""):
            if tail and text.endswith(tail):
                text = text[: len(text) - len(tail)]
                break
        return [{"role": "assistant", "content": text}]
