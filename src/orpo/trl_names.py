"""TRL's ORPOConfig / TrainingArguments keys in an orpo config: mapped where they mean something here, else one
line saying what to use instead.

Most training keys already share TRL's names and meanings (config.py). This module handles the rest of what a
TRL config holds, on the top level of the config tree, before validation: `translate(tree)` returns the tree
with mapped keys turned into orpo's, and one line for every key that has no meaning here (config.load_config
raises them as one ConfigError).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Keys with no meaning in orpo: what to do instead.
INSTEAD: dict[str, str] = {
    "push_to_hub": "upload after training with `orpo push OUTPUT_DIR --repo USER/NAME`",
    "hub_model_id": "upload after training with `orpo push OUTPUT_DIR --repo USER/NAME`",
    "hub_private_repo": "upload after training with `orpo push OUTPUT_DIR --repo USER/NAME --private`",
    "hub_strategy": "upload after training with `orpo push OUTPUT_DIR --repo USER/NAME`",
    "hub_token": "log in with `hf auth login` or set HF_TOKEN; tokens never go in a config",
    "dataloader_num_workers": "not needed: pairs are tokenized once before training (cached) and batches are built in the training process",
    "dataloader_pin_memory": "not needed: batches are built in the training process and moved to the device directly",
    "dataloader_drop_last": "not needed: one epoch visits every pair once, its last step may be short",
    "dataset_num_proc": "not needed: tokenization is batched and cached",
    "use_liger_kernel": "layout: packed (the default) already computes log-probs in chunks, without full logits",
    "disable_dropout": "orpo does not change the model's dropout; LoRA's is lora.dropout",
    "gradient_checkpointing_kwargs": "gradient_checkpointing: true uses non-reentrant checkpointing",
    "model_init_kwargs": "use the model: section (name_or_path, revision, dtype, attn_implementation, load_in_4bit, ...)",
    "is_encoder_decoder": "orpo trains decoder-only causal language models",
    "padding_value": "the tokenizer's pad token is used (layout: packed needs no padding inside a row)",
    "label_pad_token_id": "labels are per-token masks, not padded ids",
    "generate_during_eval": "generation samples are in summary.json and report.html; `orpo eval RUN` shows more",
    "load_best_model_at_end": "final/ is the last step's model; checkpoints keep earlier ones (save_steps)",
    "metric_for_best_model": "final/ is the last step's model; checkpoints keep earlier ones (save_steps)",
    "save_only_model": "checkpoints hold the trained weights plus the optimizer state needed to resume exactly",
    "logging_dir": "metrics go to OUTPUT_DIR/metrics.jsonl and, with report_to, to trackers under OUTPUT_DIR",
    "logging_first_step": "logging_steps decides which steps are logged",
    "run_name": "trackers log under the project 'orpo' in OUTPUT_DIR; name runs by output_dir",
    "remove_unused_columns": "the data doctor keeps only prompt/chosen/rejected (data.prompt_field, ...)",
    "group_by_length": "layout: packed already packs pairs by length within each step",
    "lr_scheduler_kwargs": "lr_scheduler_type is one of linear, cosine, constant, inverse_sqrt, without extra arguments",
    "tf32": "set torch.backends.cuda.matmul.allow_tf32 in your own launcher if wanted",
    "torch_compile": "not supported yet",
    "eval_accumulation_steps": "evaluation keeps only per-pair sums, never logits",
    "ddp_find_unused_parameters": "not needed: every trained parameter gets a gradient each step",
    "do_train": "`orpo train` always trains",
    "do_eval": "evaluation: eval_steps, eval_on_start (and the end of training, whenever there is held-out data)",
}

STRATEGIES = {  # key: {value: (orpo settings it means, or None when none is needed)}
    "eval_strategy": {"no": {"eval_steps": None, "eval_on_start": False}, "steps": {}},
    "evaluation_strategy": {"no": {"eval_steps": None, "eval_on_start": False}, "steps": {}},
    "save_strategy": {"no": {"save_steps": None}, "steps": {}},
    "logging_strategy": {"steps": {}},
}


def translate(tree: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(tree with TRL keys mapped, problems: one line per key that has no meaning here)."""
    tree = dict(tree)
    problems = []
    for key in [k for k in tree if k in INSTEAD or k in STRATEGIES or k == "max_completion_length"]:
        value = tree.pop(key)
        if key == "max_completion_length":  # TRL's ORPO uses it for encoder-decoder models only
            if value is not None:
                log.warning("max_completion_length=%s ignored, as TRL does for decoder-only models: responses are cut at max_length", value)
        elif key in STRATEGIES:
            value = "no" if value is False else str(value).lower()  # YAML reads a bare no as false
            if value not in STRATEGIES[key]:
                target = "save_steps" if key.startswith("save") else "logging_steps" if key.startswith("logging") else "eval_steps"
                problems.append(f"{key}: {value!r} has no equivalent here; use {target} (a number of steps"
                                + (", or a fraction of the run such as 0.2)" if target == "eval_steps" else ")"))
                continue
            for name, setting in STRATEGIES[key][value].items():
                if name in tree and tree[name] != setting:
                    problems.append(f"{key}: {value!r} conflicts with {name}={tree[name]!r}; drop one of them")
                tree[name] = setting
        else:
            problems.append(f"{key} (a TRL key) has no meaning in orpo: {INSTEAD[key]}")
    return tree, problems
