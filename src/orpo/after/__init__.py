"""Stage 4, after training: what runs on a finished run or model: run folders, `orpo eval` (with lm-eval), the
report, `orpo compare`, the model card, `orpo merge`, `orpo push`, `orpo chat`, `orpo export` (GGUF) and `orpo serve`.

May import: orpo.config, orpo.files, orpo.data, orpo.model, orpo.training.
"""
