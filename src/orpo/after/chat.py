"""`orpo chat`: talk to a run, a merged model or a base model through its chat template, tokens streamed.

Each turn renders the whole conversation with the template (generation header added), generates until the
end-of-turn token, and streams the reply to stdout with transformers' TextStreamer. `/reset` clears the
history, `/exit` (or end of input) leaves. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import sys

import torch

from ..data.pairs import prompt_ids
from .runs import load, resolve

HELP = "type a message; /reset clears the conversation, /exit (or Ctrl-D) quits"


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict[str, str]], *, max_new_tokens: int, temperature: float, top_p: float, stream=None) -> str:
    """The assistant's next message, streamed to `stream` (sys.stdout) as it is generated."""
    from transformers import TextStreamer

    ids = torch.tensor([prompt_ids(tokenizer, [messages])[0]], device=model.device)  # (1, T), as training saw them
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if stream is not None:  # TextStreamer prints; send its text where the caller wants it
        streamer.on_finalized_text = lambda text, stream_end=False: print(text, end="" if not stream_end else "\n", file=stream, flush=True)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **sampling,
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_chat(spec: str, prompt: str | None, max_new_tokens: int, temperature: float, top_p: float, system: str | None = None,
             seed: int = 0, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """`orpo chat`: one answer to `prompt`, or an interactive loop on stdin."""
    torch.manual_seed(seed)
    model, tokenizer = load(resolve(spec, overrides))
    start = [{"role": "system", "content": system}] if system else []
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stream=sys.stdout)
    if prompt is not None:
        reply(model, tokenizer, [*start, {"role": "user", "content": prompt}], **kwargs)
        return 0
    print(HELP)
    messages = list(start)
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        messages.append({"role": "assistant", "content": reply(model, tokenizer, messages, **kwargs)})
