"""ChatML on a tokenizer (and its model): orpo's own set-up for a model without a chat template, and TRL's
`setup_chat_format`, which the seed's notebook calls, built on it.

`chatml(tokenizer)` is the one set-up: <|im_start|> and <|im_end|> as special tokens (added when the vocabulary
lacks them), the ChatML template, <|im_end|> as end of sequence. `setup_chat_format(model, tokenizer)` is TRL's
last version of it on top (<|im_start|> as BOS, <|im_end|> as padding, the embeddings resized to a multiple of
64, the model's config and generation ids), with one difference that matters for the seed's merge cell: the rows
it adds are the mean of the existing rows, not random draws. That cell reloads the base and calls
setup_chat_format again before loading the adapter, so rows drawn at random would differ from the ones trained
with; mean rows are the same every time, and the trained ChatML rows travel in the adapter
(`trainable_token_indices`, see load.new_token_rows).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# <|im_start|>{role}\n{content}<|im_end|>\n per message, and the assistant header as the generation prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ADDED_ROWS = "orpo_chatml_rows"  # attribute setup_chat_format leaves on the model: the embedding rows it added


def chatml(tokenizer) -> list[int]:
    """Set up ChatML on `tokenizer` in place; returns the ids of the tokens it had to add (their embedding rows
    are new and must train)."""
    before = len(tokenizer)
    tokenizer.add_tokens([IM_START, IM_END], special_tokens=True)  # no-op for tokens the vocabulary has
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = IM_END
    new_ids = list(range(before, len(tokenizer)))
    log.info("chat template: ChatML set up (%d new tokens)", len(new_ids))
    return new_ids


def resize_embeddings(model, rows: int, pad_to_multiple_of: int | None = None) -> list[int]:
    """Resize the input (and an untied output) embeddings to hold `rows` (rounded up to a multiple), new rows set
    to the mean of the old ones: deterministic, so a model rebuilt the same way gets the same rows. Returns the
    indices of the rows added."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    new = model.get_input_embeddings().weight.shape[0]
    if new <= old:
        return []
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            weight = layer.weight  # (V, H)
            weight[old:] = weight[:old].float().mean(0).to(weight.dtype)
    return list(range(old, new))


def setup_chat_format(model, tokenizer, format: str = "chatml", resize_to_multiple_of: int | None = 64):
    """TRL's `setup_chat_format`: ChatML tokens and template on `tokenizer`, <|im_start|> as BOS and <|im_end|> as
    EOS and padding, `model`'s embeddings resized for the new tokens (to a multiple of `resize_to_multiple_of`)
    and its config and generation ids updated. Returns (model, tokenizer), changed in place.

    A tokenizer that already has a chat template gets ChatML instead (TRL refused such a tokenizer; the log says
    which template was replaced)."""
    if format != "chatml":
        raise ValueError(f"setup_chat_format: format {format!r} is not available; the only one is 'chatml'")
    if getattr(tokenizer, "chat_template", None):
        log.warning("setup_chat_format: the tokenizer's own chat template is replaced by ChatML")
    new_ids = chatml(tokenizer)
    tokenizer.bos_token = IM_START
    tokenizer.pad_token = IM_END
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # never shrinks (Qwen has spare rows)
        resize_embeddings(model, len(tokenizer), resize_to_multiple_of)
    setattr(model, ADDED_ROWS, sorted(set(getattr(model, ADDED_ROWS, [])) | set(new_ids)))
    for target in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if target is not None:
            target.bos_token_id, target.eos_token_id, target.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    return model, tokenizer
