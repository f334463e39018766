"""Stage 2, model: the tokenizer (ChatML set-up for a base model), the base model (4-bit NF4 when asked), LoRA,
the embedded default model and saving `final/`. `fast/` holds the changes to the model's own code that exist
only for speed.

May import: orpo.config, orpo.files, orpo.data.
"""
