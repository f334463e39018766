"""orpo: ORPO fine-tuning (Hong, Lee & Thorne 2024), one folder per stage in the order data flows:
data/ (rows -> token ids) -> model/ (tokenizer, model, LoRA) -> train/ (the loop) -> after/ (eval, report, card,
merge, push, chat). A module imports from its own stage and earlier ones only; config.py, trl_names.py and
files.py serve every stage, and cli.py calls into all of them.
"""
