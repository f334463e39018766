"""TRL's ORPOConfig / TrainingArguments keys in an orpo config: mapped where they mean something here, else one
line saying what to use instead.

Most training keys already share TRL's names and meanings (config.py). This module handles the rest of what a
TRL config holds (every key of TRL 1.16's ORPOConfig, TrainingArguments' included, and older names such
notebooks still use), on the top level of the config tree, before validation: `translate(tree)` returns the tree
with mapped keys turned into orpo's, and one line for every key that has no meaning here (config.load_config
raises them as one ConfigError). A key set to TRL's own default asks for nothing and is dropped quietly: a
config that spells out `push_to_hub: false` or `dataloader_num_workers: 0` ports as it is.
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
    "do_predict": "`orpo eval RUN --data FILE` evaluates a run on other data",
    "use_cpu": "the device comes from the machine and the launch: CUDA when present (CUDA_VISIBLE_DEVICES= for the CPU)",
    "no_cuda": "the device comes from the machine and the launch: CUDA when present (CUDA_VISIBLE_DEVICES= for the CPU)",
    "auto_find_batch_size": "set per_device_train_batch_size; `layout: packed` bounds each pass by max_tokens_per_batch",
    "label_smoothing_factor": "ORPO's loss has no label smoothing",
    "neftune_noise_alpha": "not supported: ORPO trains on the embeddings as they are",
    "optim_args": "the optimizer's settings are adam_beta1, adam_beta2, adam_epsilon, weight_decay",
    "optim_target_modules": "optim is AdamW (plain or 8-bit) over every trained weight",
    "average_tokens_across_devices": "orpo always normalises by the global token and pair counts, over micro-batches and processes",
    "full_determinism": "a seeded run repeats to the last digit on the same machine (seed)",
    "data_seed": "the data order follows seed; data.shuffle_seed chooses and splits the rows",
    "ignore_data_skip": "resume_from_checkpoint continues exactly where the run stopped, in the same data order",
    "resume_from_checkpoint": "resume_from_checkpoint: 'latest' or a checkpoint folder",
    "train_sampling_strategy": "every epoch visits each pair once, in a seeded random order",
    "length_column_name": "pairs are packed by their token lengths, computed when tokenizing",
    "label_names": "labels are per-token masks built from the pairs",
    "use_cache": "gradient_checkpointing decides the model's cache while training",
    "restore_callback_states_from_checkpoint": "checkpoints hold the weights, optimizer, schedule, step and RNG state",
    "greater_is_better": "final/ is the last step's model; checkpoints keep earlier ones (save_steps)",
    "max_target_length": "responses are cut at max_length (prompt + response)",
}

# Keys of one family share their line.
FAMILIES: dict[str, str] = {
    "hub_": "upload after training with `orpo push OUTPUT_DIR --repo USER/NAME` (from Python: run.push or trainer.push_to_hub)",
    "push_to_hub_": "upload after training with `orpo push OUTPUT_DIR --repo USER/NAME` (from Python: run.push or trainer.push_to_hub)",
    "ddp_": "processes and sharding come from the launch: `accelerate launch --config_file configs/accelerate/...` or torchrun",
    "fsdp": "processes and sharding come from the launch: `accelerate launch --config_file configs/accelerate/fsdp2-*.yaml`",
    "deepspeed": "DeepSpeed comes from the launch: `accelerate launch --config_file configs/accelerate/zero*.yaml`",
    "local_rank": "processes come from the launch (accelerate launch or torchrun set the ranks)",
    "accelerator_config": "processes and mixed precision come from the launch and bf16/fp16",
    "parallelism_config": "processes and sharding come from the launch: `accelerate launch --config_file configs/accelerate/...`",
    "dataloader_": "not needed: pairs are tokenized once before training (cached) and batches are built in the training process",
    "torch_compile": "not supported yet",
    "torch_empty_cache_steps": "not needed: the packed layout keeps each pass within max_tokens_per_batch",
    "log_": "log verbosity: `orpo -v` for debug logging; every logged metric goes to metrics.jsonl",
    "logging_nan_inf_filter": "non-finite losses stop or skip the step (on_nonfinite), and are logged as null",
    "include_num_input_tokens_seen": "metrics.jsonl logs tokens_per_second and summary.json the tokens trained on",
    "include_tokens_per_second": "metrics.jsonl logs tokens_per_second",
    "skip_memory_metrics": "summary.json records the peak GPU memory of a CUDA run",
    "disable_tqdm": "progress bars are orpo's own (tqdm.auto); they show on the main process",
    "debug": "`orpo -v` logs at debug level",
    "eval_": "evaluation keeps per-pair sums and reports TRL's eval_ metrics; eval_steps and eval_on_start set when",
    "prediction_loss_only": "evaluation reports the loss and every ORPO metric, never predictions",
    "include_for_metrics": "evaluation reports the loss and every ORPO metric, never predictions",
    "include_inputs_for_metrics": "evaluation reports the loss and every ORPO metric, never predictions",
    "batch_eval_metrics": "evaluation keeps per-pair sums, pooled over the whole held-out set",
    "bf16_full_eval": "evaluation runs in the training precision (bf16/fp16 autocast)",
    "fp16_full_eval": "evaluation runs in the training precision (bf16/fp16 autocast)",
    "project": "trackers log under the project 'orpo' (report_to: tensorboard, wandb, mlflow)",
    "trackio_": "trackers: report_to takes tensorboard, wandb and mlflow",
    "save_on_each_node": "the main process writes checkpoints and final/ (each process its own shards)",
    "enable_jit_checkpoint": "checkpoints are saved every save_steps",
    "liger_kernel_config": "layout: packed (the default) already computes log-probs in chunks, without full logits",
    "activation_checkpointing_kwargs": "gradient_checkpointing: true uses non-reentrant checkpointing",
    "per_gpu_": "per_device_train_batch_size / per_device_eval_batch_size",
    "half_precision_backend": "bf16 / fp16 use torch autocast through Accelerate",
    "fp16_opt_level": "bf16 / fp16 use torch autocast through Accelerate",
    "use_mps_device": "the device comes from the machine and the launch",
    "use_ipex": "not supported",
    "jit_mode_eval": "not supported",
    "tpu_num_cores": "not supported",
    "ray_scope": "orpo sweep is not there yet; run one config per run",
    "split_batches": "each process takes its share of every step's pairs (per_device_train_batch_size each)",
    "dispatch_batches": "each process builds its own batches",
    "mp_parameters": "not supported",
}

# TRL's default (TRL 1.16, TrainingArguments included; older names: their last default) of each key above and of
# the mapped ones: a key given with this value asks for nothing and is dropped without a word.
TRL_DEFAULTS: dict[str, Any] = {
    "push_to_hub": False, "hub_model_id": None, "hub_private_repo": None, "hub_strategy": "every_save", "hub_token": None,
    "hub_always_push": False, "hub_revision": None, "dataloader_num_workers": 0, "dataloader_pin_memory": True,
    "dataloader_drop_last": False, "dataloader_persistent_workers": False, "dataloader_prefetch_factor": None,
    "dataloader_multiprocessing_context": None, "dataloader_in_order": True, "dataset_num_proc": None,
    "use_liger_kernel": False, "disable_dropout": True, "gradient_checkpointing_kwargs": None, "model_init_kwargs": None,
    "is_encoder_decoder": None, "padding_value": None, "label_pad_token_id": -100, "generate_during_eval": False,
    "load_best_model_at_end": False, "metric_for_best_model": None, "save_only_model": False, "logging_dir": None,
    "logging_first_step": False, "run_name": None, "remove_unused_columns": True, "group_by_length": False,
    "lr_scheduler_kwargs": None, "tf32": None, "torch_compile": False, "torch_compile_backend": None,
    "torch_compile_mode": None, "eval_accumulation_steps": None, "ddp_find_unused_parameters": None, "do_train": False,
    "do_eval": False, "do_predict": False, "use_cpu": False, "no_cuda": False, "auto_find_batch_size": False,
    "label_smoothing_factor": 0.0, "neftune_noise_alpha": None, "optim_args": None, "optim_target_modules": None,
    "average_tokens_across_devices": True, "full_determinism": False, "data_seed": None, "ignore_data_skip": False,
    "train_sampling_strategy": "random", "length_column_name": "length", "label_names": None, "use_cache": False,
    "restore_callback_states_from_checkpoint": False, "greater_is_better": None, "max_target_length": None,
    "ddp_bucket_cap_mb": None, "ddp_broadcast_buffers": None, "ddp_static_graph": None, "ddp_backend": None,
    "ddp_timeout": 1800, "fsdp": None, "fsdp_config": None, "deepspeed": None, "local_rank": -1,
    "accelerator_config": None, "parallelism_config": None, "torch_empty_cache_steps": None, "log_level": "passive",
    "log_level_replica": "warning", "log_on_each_node": True, "logging_nan_inf_filter": True,
    "include_num_input_tokens_seen": "no", "include_tokens_per_second": False, "skip_memory_metrics": True,
    "disable_tqdm": None, "debug": "", "eval_delay": 0, "eval_do_concat_batches": True, "eval_use_gather_object": False,
    "prediction_loss_only": False, "include_for_metrics": [], "include_inputs_for_metrics": False,
    "batch_eval_metrics": False, "bf16_full_eval": False, "fp16_full_eval": False, "project": "huggingface",
    "trackio_space_id": None, "trackio_bucket_id": None, "trackio_static_space_id": None, "save_on_each_node": False,
    "enable_jit_checkpoint": False, "liger_kernel_config": None, "activation_checkpointing_kwargs": None,
    "per_gpu_train_batch_size": None, "per_gpu_eval_batch_size": None, "half_precision_backend": "auto",
    "fp16_opt_level": "O1", "use_mps_device": False, "use_ipex": False, "jit_mode_eval": False, "tpu_num_cores": None,
    "ray_scope": "last", "split_batches": None, "dispatch_batches": None, "mp_parameters": "",
    "push_to_hub_model_id": None, "push_to_hub_organization": None, "push_to_hub_token": None,
    # mapped keys
    "eval_strategy": "no", "evaluation_strategy": "no", "save_strategy": "steps", "logging_strategy": "steps",
    "max_completion_length": None, "trust_remote_code": False, "activation_checkpointing": None,
}
RENAMED = {"trust_remote_code": "model.trust_remote_code", "activation_checkpointing": "gradient_checkpointing"}


def instead(key: str) -> str | None:
    """What to use instead of TRL key `key`, or None for a key this module does not know."""
    if key in INSTEAD:
        return INSTEAD[key]
    family = next((f for f in FAMILIES if key.startswith(f)), None)
    return FAMILIES[family] if family is not None else None


def known(key: str) -> bool:
    """A TRL key this module maps or explains."""
    return key in TRL_DEFAULTS or key in STRATEGIES or key in RENAMED or instead(key) is not None


STRATEGIES = {  # key: {value: (orpo settings it means, or None when none is needed)}
    "eval_strategy": {"no": {"eval_steps": None, "eval_on_start": False}, "steps": {}},
    "evaluation_strategy": {"no": {"eval_steps": None, "eval_on_start": False}, "steps": {}},
    "save_strategy": {"no": {"save_steps": None}, "steps": {}},
    "logging_strategy": {"steps": {}},
}


def translate(tree: dict[str, Any], ours: set[str] | frozenset[str] = frozenset()) -> tuple[dict[str, Any], list[str]]:
    """(tree with TRL keys mapped, problems: one line per key that has no meaning here). `ours`: the config's own
    top-level keys, which are never TRL's to map (eval_steps is orpo's, not of the eval_ family)."""
    tree = dict(tree)
    problems = []
    for key in [k for k in tree if k not in ours and known(k)]:
        value = tree.pop(key)
        if key in TRL_DEFAULTS and value == TRL_DEFAULTS[key] and key not in STRATEGIES:
            continue  # asks for nothing
        if key in RENAMED:
            section, _, name = RENAMED[key].rpartition(".")
            node = tree.setdefault(section, {}) if section else tree
            if name in node and node[name] != value:
                problems.append(f"{key}: {value!r} conflicts with {RENAMED[key]}={node[name]!r}; drop one of them")
            node[name] = value
        elif key == "max_completion_length":  # TRL's ORPO uses it for encoder-decoder models only
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
            problems.append(f"{key} (a TRL key) has no meaning in orpo: {instead(key)}")
    return tree, problems
