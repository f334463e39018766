"""TRL's names on orpo: `ORPOConfig`, `ORPOTrainer` and `setup_chat_format`, so code written against TRL's ORPO
(the seed's "Fine-tune Llama 3 with ORPO" notebook among it) runs with one import changed:

    from orpo import ORPOConfig, ORPOTrainer, setup_chat_format     # was: from trl import ...

`ORPOConfig` takes every key of TRL's ORPOConfig, TrainingArguments' included, and the ones TRL has since dropped
or renamed (max_prompt_length, evaluation_strategy): keys with a meaning here are orpo's (config.py), the rest
follow trl_names (mapped, or one line saying what to use instead). `ORPOTrainer` trains the model the user built
(full precision, 4-bit, or already a peft model) on their rows with orpo's loop (training.loop): the same loss,
layouts and fused layers as `orpo train`, into the same run folder (config.yaml, metrics.jsonl, summary.json,
final/). Rows whose chosen and rejected the chat template already rendered (the seed's map) are read back into
messages (data.templated): the raw prompt column is not put in front of them a second time.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .config import MEMORY, Config, ConfigError, make_config
from .data.formats import DataError
from .model.chat_format import ADDED_ROWS, CHATML_TEMPLATE, setup_chat_format

__all__ = ["ORPOConfig", "ORPOTrainer", "setup_chat_format"]

log = logging.getLogger(__name__)

# Keys ORPOTrainer itself reads (its push_to_hub); everything else goes into the run's Config.
HUB_KEYS = {"push_to_hub": False, "hub_model_id": None, "hub_private_repo": None}
# ORPOTrainer arguments orpo does not take: what to do instead.
UNSUPPORTED = {
    "data_collator": "orpo builds its own batches (the prompt computed once, pairs packed); drop data_collator",
    "model_init": "pass the model itself (model=...)",
    "optimizers": "choose the optimizer with optim and its settings (learning_rate, adam_beta1, ...) in ORPOConfig",
    "preprocess_logits_for_metrics": "evaluation reports TRL's ORPO metrics without keeping logits",
    "compute_metrics": "evaluation reports TRL's ORPO metrics (eval_loss, eval_rewards/accuracies, ...)",
}


class ORPOConfig:
    """TRL's ORPOConfig as orpo reads it: `ORPOConfig(learning_rate=8e-6, beta=0.1, max_length=1024, ...)`.

    Every key of TRL's ORPOConfig (TrainingArguments' included) is accepted: orpo's own keys (most share TRL's
    names and defaults; `orpo config` lists them), TRL's older names (evaluation_strategy, max_prompt_length), and
    the rest as trl_names says (a key set to TRL's default is dropped; another value raises ConfigError with one
    line per key saying what to use instead). Nested keys are dotted (`**{"lora.r": 8}` when no peft_config is
    given). Attributes read back the resolved settings (`args.learning_rate`); `config` is orpo's Config."""

    def __init__(self, output_dir: str | None = None, **kwargs: Any):
        self.push_to_hub, self.hub_model_id, self.hub_private_repo = (kwargs.pop(k, d) for k, d in HUB_KEYS.items())
        if kwargs.get("report_to") == "all":
            kwargs["report_to"] = installed_trackers()
        tree = dict(kwargs, **({"output_dir": output_dir} if output_dir is not None else {}))
        self.config: Config = make_config(tree)

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and name in Config.model_fields:
            return getattr(config, name)
        raise AttributeError(f"ORPOConfig has no setting {name!r} (orpo config lists them)")

    def __repr__(self) -> str:
        return f"ORPOConfig({self.config.model_dump_json(exclude_defaults=True)})"


def installed_trackers() -> list[str]:
    """report_to='all' as TRL reads it: every tracker orpo supports that is installed."""
    import importlib.util

    return [name for name in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(name) is not None]


class ORPOTrainer:
    """TRL's ORPOTrainer on orpo's loop:

        trainer = ORPOTrainer(model=model, args=ORPOConfig(...), train_dataset=train, eval_dataset=test,
                              peft_config=LoraConfig(...), tokenizer=tokenizer)   # or processing_class=tokenizer
        trainer.train(); trainer.evaluate(); trainer.save_model("out"); trainer.push_to_hub()

    `model`: a transformers causal LM (full precision, or 4-bit by bitsandbytes, prepared or not), a peft model (then
    no peft_config), or a Hub id / folder that orpo loads. Datasets: a `datasets.Dataset` (a split), a list of
    dicts or a DataFrame, in any layout orpo reads (data.formats), or rows the chat template already rendered.
    The model is made ready and the rows tokenized here, as TRL does: errors show at construction."""

    def __init__(self, model=None, args: ORPOConfig | None = None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init=None, callbacks=None, optimizers=(None, None),
                 preprocess_logits_for_metrics=None, peft_config=None, compute_metrics=None, tokenizer=None):
        from .api import reset_accelerate, show_log_lines
        from .training.loop import set_up

        show_log_lines()
        given_args = {"data_collator": data_collator, "model_init": model_init, "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
                      "compute_metrics": compute_metrics, "optimizers": None if optimizers in (None, (None, None)) else optimizers}
        problems = [f"{name}: {UNSUPPORTED[name]}" for name, value in given_args.items() if value is not None]
        if problems:
            raise ConfigError("ORPOTrainer: " + "; ".join(problems))
        self.args = args if args is not None else ORPOConfig()
        tokenizer = processing_class if processing_class is not None else tokenizer
        config, given = self._settings(model, tokenizer, train_dataset, eval_dataset, peft_config)
        self.callbacks = [c() if isinstance(c, type) else c for c in callbacks or []]
        self._trained = False
        reset_accelerate()  # nothing of an earlier run in this process (a notebook rerun) changes this one
        self._run = set_up(config, given)
        self.config = self._run.config
        from transformers import TrainerControl, TrainerState

        self.state = TrainerState(max_steps=self._run.total_steps, logging_steps=config.logging_steps,
                                  eval_steps=config.eval_interval(self._run.total_steps) or 0, save_steps=config.save_steps or 0)
        self.control = TrainerControl()
        self._run.metrics_log.listeners.append(self._on_line)

    # -------------------------------------------------------------- set-up

    def _settings(self, model, tokenizer, train_dataset, eval_dataset, peft_config):
        """The run's Config (the args, with the model, LoRA and data sections describing what was given) and the
        loop's Given."""
        from .training.loop import Given

        config = self.args.config
        if train_dataset is None:
            raise DataError("ORPOTrainer: train_dataset is required")
        model_section: dict[str, Any] = {}
        if isinstance(model, str | Path):
            model_section["name_or_path"], model = str(model), None
        elif model is None:
            raise ConfigError("ORPOTrainer: model is required (a transformers model, a peft model, or a Hub id or folder)")
        else:
            check_model(model, peft_config)
            base = model.get_base_model() if hasattr(model, "peft_config") else model
            model_section.update(name_or_path=str(getattr(base.config, "_name_or_path", "") or "unknown"),
                                 load_in_4bit=bool(getattr(base, "is_loaded_in_4bit", False)),
                                 chat_template="chatml" if tokenizer is not None and tokenizer.chat_template == CHATML_TEMPLATE else "own")
            if tokenizer is None:
                raise ConfigError("ORPOTrainer: pass the model's tokenizer (processing_class=tokenizer, or tokenizer=tokenizer)")
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("ORPOTrainer: the tokenizer has no chat template, which orpo renders every pair with: call "
                              "model, tokenizer = setup_chat_format(model, tokenizer) first (ChatML), or set tokenizer.chat_template")
        updates: dict[str, Any] = {"model": model_section, "lora": lora_section(model, peft_config, config),
                                   "data": {"path": MEMORY, "test_size": 0, "num_samples": None}}
        if eval_dataset is None and (config.eval_steps is not None or config.eval_on_start):
            log.warning("no eval_dataset: no evaluation during training (eval_steps and eval_on_start are off)")
            updates.update(eval_steps=None, eval_on_start=False)
        config = make_config(config, updates)
        added = list(getattr(model, ADDED_ROWS, [])) if model is not None else []
        return config, Given(model=model, tokenizer=tokenizer, rows=(train_dataset, eval_dataset), lora=peft_config, new_token_ids=added)

    # -------------------------------------------------------------- TRL's surface

    @property
    def model(self):
        """The model being trained (with its LoRA adapters)."""
        return self._run.accelerator.unwrap_model(self._run.model)

    @property
    def tokenizer(self):
        return self._run.tokenizer

    processing_class = tokenizer

    @property
    def train_dataset(self):
        """The tokenized training pairs."""
        return self._run.train_ds

    @property
    def eval_dataset(self):
        return self._run.eval_ds

    def train(self, resume_from_checkpoint: str | bool | None = None):
        """Train to the last step, evaluate on eval_dataset, write OUTPUT_DIR/final/ (adapter or model, tokenizer),
        summary.json, report.html; returns transformers' TrainOutput (global_step, training_loss, metrics)."""
        from transformers.trainer_utils import TrainOutput

        from .after.card import finish_run
        from .training.loop import fit

        if resume_from_checkpoint:
            raise ConfigError("ORPOTrainer.train: resume with resume_from_checkpoint='latest' (or a checkpoint folder) in ORPOConfig")
        if self._trained:
            raise RuntimeError("this ORPOTrainer has trained already: build a new one to train again")
        self._trained = True
        started = time.perf_counter()
        self._event("on_train_begin")
        fit(self._run, finish=finish_run, started=started)
        runtime = time.perf_counter() - started
        losses = [(e["step"], e["loss"]) for e in self.state.log_history if "loss" in e and e["loss"] is not None]
        training_loss = weighted_mean(losses)
        pairs = self._run.state.micro_batches * self.config.per_device_train_batch_size  # as TRL counts its samples
        metrics = {"train_runtime": round(runtime, 4), "train_samples_per_second": round(pairs / runtime, 3),
                   "train_steps_per_second": round(self._run.state.step / runtime, 3), "train_loss": training_loss,
                   "epoch": self.state.epoch}
        self.state.log_history.append({**metrics, "step": self._run.state.step})
        self._event("on_train_end")
        return TrainOutput(self._run.state.step, training_loss, metrics)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out metrics on eval_dataset with TRL's names (eval_loss, eval_rewards/accuracies, eval_nll_loss,
        ...), also written to metrics.jsonl."""
        from .training.loop import evaluate

        if eval_dataset is not None:
            raise ConfigError("ORPOTrainer.evaluate: pass eval_dataset when building the trainer")
        if self._run.eval_ds is None:
            raise DataError("ORPOTrainer.evaluate: no eval_dataset was given")
        started = time.perf_counter()
        metrics = evaluate(self._run, f"step {self._run.state.step}", generate=False)
        runtime = time.perf_counter() - started
        out = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
        out.update({f"{metric_key_prefix}_runtime": round(runtime, 4),
                    f"{metric_key_prefix}_samples_per_second": round(len(self._run.eval_ds) / runtime, 3),
                    "epoch": self.state.epoch})
        return out

    def save_model(self, output_dir: str | Path | None = None, _internal_call: bool = False) -> None:
        """The adapter (or full model) and tokenizer into `output_dir` (default args.output_dir), loadable with
        peft/transformers as they are; new ChatML rows travel in the adapter."""
        from .model.load import save_final
        from .training import engine

        run = self._run
        gathered = engine.full_state(run.model, run.accelerator, trained_only=run.config.lora.enabled)
        if run.accelerator.is_main_process:
            save_final(self.model, run.tokenizer, Path(output_dir or self.config.output_dir), gathered)

    def push_to_hub(self, commit_message: str | None = None, blocking: bool = True, **kwargs) -> str:
        """Upload the trained run (final/ with its model card and plots) to args.hub_model_id (default: the
        output folder's name under your account); returns the repository's URL."""
        from .api import push

        repo = self.args.hub_model_id or Path(self.config.output_dir).resolve().name
        return push(self.config.output_dir, repo, private=bool(self.args.hub_private_repo))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add a line to metrics.jsonl (and the trackers) at the current step."""
        self._run.metrics_log.write(self._run.state.step, logs)

    # -------------------------------------------------------------- callbacks

    def _on_line(self, step: int, values: dict[str, Any]) -> None:
        """Each metrics line as a log_history entry, and the callbacks' on_log / on_evaluate."""
        self.state.global_step = step
        self.state.epoch = values.get("epoch", self.state.epoch)
        entry = {**{k: v for k, v in values.items() if k != "time"}, "step": step}
        self.state.log_history.append(entry)
        if any(k.startswith("eval_") for k in values):
            self._event("on_evaluate", metrics=entry)
        self._event("on_log", logs=entry)

    def _event(self, name: str, **kwargs) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, name, None)
            if handler is not None:
                handler(self.args, self.state, self.control, model=self.model, **kwargs)


def weighted_mean(points: list[tuple[int, float]]) -> float:
    """Mean of logged window means, each weighted by the steps its window covered (the step since the last line)."""
    total, steps, last = 0.0, 0, 0
    for step, value in points:
        total, steps, last = total + value * (step - last), steps + step - last, step
    return total / steps if steps else float("nan")


def check_model(model, peft_config) -> None:
    """One line for a model orpo cannot train as given."""
    if hasattr(model, "peft_config") and peft_config is not None:
        raise ConfigError("ORPOTrainer: the model is already a PeftModel and peft_config is given: pass one of them "
                          "(the model's own adapters train when peft_config is None)")
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ConfigError(f"ORPOTrainer: the model has {len(meta)} weights on the meta device (e.g. {meta[0]}): load it "
                          "with its weights (from_pretrained without device_map='meta'; with device_map, enough memory)")
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    if getattr(base, "is_loaded_in_4bit", False) and peft_config is None and not hasattr(model, "peft_config"):
        raise ConfigError("ORPOTrainer: a 4-bit model trains through LoRA adapters: pass peft_config=LoraConfig(...)")


def lora_section(model, peft_config, config: Config) -> dict[str, Any]:
    """The config's lora section for what was given: the peft config's settings, or full fine-tuning."""
    lora = peft_config if peft_config is not None else (next(iter(model.peft_config.values())) if hasattr(model, "peft_config") else None)
    if lora is None:
        return {"enabled": model is None and config.lora.enabled}  # a model orpo loads keeps the config's choice
    targets = lora.target_modules
    targets = targets if isinstance(targets, str) else sorted(targets or [])
    return {"enabled": True, "r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout, "target_modules": targets}
