"""orpo from Python: each command is a function here, and the command line is its arguments (cli.py).

    run = orpo.train("my.yaml", learning_rate=1e-5, **{"lora.r": 8})   # orpo train my.yaml learning_rate=1e-5 lora.r=8
    run.summary["after"]["rewards/accuracies"]                          # the before/after table as data
    run.evaluate(data="other.jsonl")                                    # orpo eval RUN --data other.jsonl
    run.merge("merged", dtype="bf16")                                   # orpo merge RUN --out merged
    run.export("model.gguf", type="q8_0")                               # orpo export RUN --gguf model.gguf --type q8_0
    run.chat("What is 2 + 2?")                                          # orpo chat RUN --prompt ...
    run.push("me/my-model")                                             # orpo push RUN --repo me/my-model

Errors are exceptions whose message is the one line the command prints (ConfigError, DataError, HubError,
CheckFailed, ...); only the command line turns them into exit codes. A call leaves nothing behind that changes
the next one in the same process (a notebook reruns cells): Accelerate's process-wide state is cleared before
and after a training run, and the caller's random number generators are restored after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, make_config
from .training.engine import isolated, reset_accelerate  # noqa: F401  (orpo.api.isolated, as before)


class CheckFailed(RuntimeError):
    """A merge or export whose check against the source model failed; `result` holds what was measured."""

    def __init__(self, message: str, result: Any):
        super().__init__(message)
        self.result = result


def show_log_lines() -> None:
    """orpo's own log lines (what was loaded, detected, fused; each evaluation) on stderr at INFO, for a notebook
    or script that has not set up logging; one that has (a handler on the root logger) keeps its own."""
    import logging
    import sys

    logger = logging.getLogger("orpo")
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def train(config: str | Path | dict | Config | None = None, /, **overrides) -> Run:
    """Fine-tune with ORPO as `config` says: a YAML file's path, a dict or a Config; None is the embedded demo
    (what `orpo train` runs without a file). Keyword arguments override keys, dotted ones included
    (`orpo.train("my.yaml", learning_rate=1e-5, **{"lora.r": 8})`). Returns the finished run."""
    from .after.card import finish_run
    from .training.loop import train as train_loop

    settings = make_config(config, overrides)
    show_log_lines()
    with isolated():
        summary = train_loop(settings, finish=finish_run)  # finish: report.html, plots/, final/README.md
    return Run(settings.output_dir, summary)


def sweep(config: str | Path | dict | Config | None = None, /, search: list[str] | dict | None = None, *, trials: int | None = None,
          time: str | float | None = None, objective: str = "accuracy", validation_size: float = 0.1, out: str | Path = "sweep",
          storage: str | None = None, study: str | None = None, prune: bool = True, prune_after: int = 2,
          stale_after: str | float = "10m", **overrides):
    """Choose settings on validation data (`orpo sweep`): an Optuna study over `search` ({key: [values] or
    "log(lo,hi)" / "uniform(lo,hi)" / "int(lo,hi)"}, or the command line's key=spec items and YAML files), one run
    folder per trial under `out`, scored by `objective` (accuracy, balanced_accuracy, loss, task_accuracy) on a
    validation split of `validation_size` taken from the training rows. `trials`: finished trials the study should
    hold (default: the grid's size when every key is a list); `time`: stop starting trials after this ('2h');
    `storage`/`study`: a journal file or database URL several processes or machines share. Keyword arguments
    override config keys (none of them may be searched). Returns search.sweep.SweepResult: the trials, the best
    trial with its config file (best.yaml), the test split's measurement and the table."""
    from .after.card import finish_run
    from .search.space import parse_space
    from .search.sweep import parse_duration, run_sweep

    if search is None:
        raise ConfigError("sweep: give the search space, e.g. search={'beta': [0.1, 0.5], 'learning_rate': 'log(1e-5,1e-3)'}")
    settings = make_config(config, overrides)
    space = parse_space(search)
    show_log_lines()
    return run_sweep(settings, space, out=out, trials=trials, timeout=parse_duration(time), objective=objective,
                     validation_size=validation_size, storage=storage, study_name=study, fixed=overrides, prune=prune,
                     prune_after=prune_after, stale_after=parse_duration(stale_after), finish=finish_run)


def load_run(path: str | Path) -> Run:
    """The run `orpo train` (or orpo.train, or ORPOTrainer) left in `path`."""
    from .after.runs import is_run

    folder = Path(path)
    if not is_run(folder):
        raise FileNotFoundError(f"{path} is not a finished run (config.yaml and final/)")
    return Run(folder)


def _remote(trust_remote_code: bool) -> list[str]:
    return ["model.trust_remote_code=true"] if trust_remote_code else []


def _items(overrides: dict[str, Any]) -> list[str]:
    """{key: value} as the key=value items the after stage takes (values written as YAML reads them back)."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def evaluate(target: str | Path, data: str | Path | None = None, *, compare: str | None = None, samples: int = 4,
             generate: bool = True, lm_eval: list[str] | None = None, lm_eval_include: str | None = None,
             lm_eval_limit: int | None = None, trust_remote_code: bool = False, **overrides) -> dict[str, dict]:
    """Held-out metrics of a run, merged model, 'builtin', Hub id or model folder (`orpo eval`): {name: metrics}
    for `target`, and first for `compare` when given (a base model is measured on the target's split). `data`
    evaluates on other preference data; keyword arguments override config keys (data.test_size, beta, ...)."""
    from .after.eval import evaluate_targets

    harness = dict(tasks=list(lm_eval), include_path=lm_eval_include, limit=lm_eval_limit) if lm_eval else None
    items = [*_items(overrides), *_remote(trust_remote_code)]
    return evaluate_targets(str(target), items, None if data is None else str(data), compare, samples, generate, harness)


@dataclass
class Merged:
    """A merged model folder and its check against the adapter model (after.merge.MergeCheck)."""

    path: Path
    check: Any


def merge(run: str | Path, out: str | Path, *, dtype: str = "bf16", max_shard_size: str = "2GB",
          trust_remote_code: bool = False) -> Merged:
    """Fold a run's LoRA adapter into its base and save a plain model in `dtype` (bf16, fp16, fp32) to `out`,
    then check its logits against the adapter model (`orpo merge`). Raises CheckFailed when they differ by more
    than the dtype's rounding explains (the folder stays, with orpo_merge.json)."""
    from .after.merge import merge_and_check

    path, check = merge_and_check(str(run), dtype, str(out), max_shard_size, _remote(trust_remote_code))
    if not check.passed:
        raise CheckFailed(f"merged model {path}: logits differ from the adapter model's by {check.max_abs_diff:.3e} "
                          f"(tolerance {check.tolerance:.3e})", check)
    return Merged(path, check)


def export(target: str | Path, gguf: str | Path, *, type: str = "f16", quantize: list[str] | tuple[str, ...] = (),
           modelfile: bool = False, force: bool = False, trust_remote_code: bool = False) -> dict:
    """One GGUF file for llama.cpp and Ollama from a run or model, checked by llama.cpp (`orpo export`);
    returns what was measured. Raises CheckFailed (no file left) when the check fails."""
    from .after.export import CheckFailed as ExportCheckFailed
    from .after.export import export_gguf

    try:
        return export_gguf(str(target), gguf, type, list(quantize), modelfile, force, _remote(trust_remote_code))
    except ExportCheckFailed as exc:
        raise CheckFailed(f"{gguf}: llama.cpp's check of the GGUF failed; no file was left", exc.result) from None


def push(folder: str | Path, repo: str, *, private: bool = False, dry_run: str | Path | None = None) -> str:
    """Upload a run's adapter or a merged model with its model card and plots to the Hub (`orpo push`); returns
    the repository's URL. Needs a token (HF_TOKEN or `hf auth login`). `dry_run`: write what would be uploaded
    into that folder instead (no network) and return its path."""
    from .after.push import push_run

    url, _ = push_run(str(folder), repo, private, None if dry_run is None else str(dry_run))
    return url if url is not None else str(dry_run)


def chat(target: str | Path, prompt: str | list[dict[str, str]], *, system: str | None = None, max_new_tokens: int = 256,
         temperature: float = 0.0, top_p: float = 0.9, seed: int = 0, trust_remote_code: bool = False, stream=None) -> str:
    """The model's reply to `prompt` (a message, or a whole conversation as a message list) through its chat
    template (`orpo chat --prompt`); greedy at temperature 0. `stream`: a file the reply is written to as it comes."""
    return _Chatter(str(target), _remote(trust_remote_code)).reply(prompt, system, max_new_tokens, temperature, top_p, seed, stream)


class _Chatter:
    """A loaded model to chat with, kept for the next message."""

    def __init__(self, target: str, overrides: list[str]):
        from .after.runs import load, resolve

        self.model, self.tokenizer = load(resolve(target, overrides))

    def reply(self, prompt, system, max_new_tokens, temperature, top_p, seed, stream) -> str:
        import torch

        from .after.chat import reply

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        torch.manual_seed(seed)
        return reply(self.model, self.tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, stream=stream)


def report(run: str | Path) -> Path:
    """Rebuild a run's report.html and plots/*.png (`orpo report`); returns the page's path."""
    from .after.report import write_report

    return write_report(run)


def compare(runs: list[str | Path], out: str | Path = "compare.html") -> Path:
    """One page with runs side by side: config keys that differ, held-out metrics, overlaid curves (`orpo compare`)."""
    from .after.compare import compare_runs

    return compare_runs([str(r) for r in runs], str(out))[1]


def plan(config: str | Path | dict | Config | None = None, /, *, gpus: list[str] | tuple[str, ...] | None = None,
         num_gpus: int = 1, engine: str = "ddp", read_data: bool = True, **overrides):
    """What `config` needs before it runs (`orpo plan`): peak memory per device by part, orpo's and TRL's, time
    per step and per run on each of `gpus` (names from orpo.training.gpus.GPUS, or "cpu"; default all), a verdict
    per GPU and the smallest changes that make the job fit. Loads no model: the model's config.json and, when
    `read_data`, the training pairs' token lengths. Returns a training.plan.Plan (`.as_dict()`, `render(plan)`);
    raises ConfigError for an invalid config and training.plan.PlanError for an unreadable model config or an
    unknown GPU."""
    from .training.plan import plan_job

    show_log_lines()
    return plan_job(make_config(config, overrides), gpus=list(gpus) if gpus else None, num_gpus=num_gpus, engine=engine,
                    read_data=read_data)


def inspect_data(config: str | Path | dict | Config | None = None, /, **overrides) -> dict:
    """The data doctor's report for a training config (`orpo data inspect --json`): rows read, kept and dropped,
    token lengths, findings (errors and warnings), rendered examples."""
    from .data.doctor import diagnose
    from .data.pairs import prepare
    from .model.load import load_tokenizer

    settings = config if isinstance(config, Config) and not overrides else make_config(config if config is not None else {}, overrides)
    tokenizer, _ = load_tokenizer(settings)
    return diagnose(settings, tokenizer, prepare(settings, tokenizer))


class Run:
    """A finished run folder: its settings, results and what can be done with it. In Jupyter it shows itself as
    its report (the before/after table and the training curves)."""

    def __init__(self, path: str | Path, summary: dict | None = None):
        self.path = Path(path)
        self._summary = summary  # what train returned, for a process that did not write summary.json
        self._chatter: _Chatter | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def config(self) -> Config:
        """The resolved settings the run trained with (config.yaml)."""
        from .config import load_config

        return load_config(self.path / "config.yaml")

    @property
    def summary(self) -> dict:
        """summary.json: data counts, the held-out metrics `before` and `after` training, steps, tokens, time."""
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.is_file() or self._summary is None else self._summary

    @property
    def metrics(self) -> list[dict]:
        """metrics.jsonl's lines: one per log step and per evaluation (eval_ keys)."""
        from .after.report import read_metrics

        return read_metrics(self.path)

    def evaluate(self, data: str | Path | None = None, **kwargs) -> dict:
        """This run's held-out metrics now (or on `data`); see orpo.evaluate for the keyword arguments."""
        return evaluate(self.path, data, **kwargs)[str(self.path)]

    def merge(self, out: str | Path, **kwargs) -> Merged:
        """See orpo.merge."""
        return merge(self.path, out, **kwargs)

    def export(self, gguf: str | Path, **kwargs) -> dict:
        """See orpo.export."""
        return export(self.path, gguf, **kwargs)

    def push(self, repo: str, *, private: bool = False) -> str:
        """See orpo.push."""
        return push(self.path, repo, private=private)

    def chat(self, prompt: str | list[dict[str, str]], **kwargs) -> str:
        """The trained model's reply (the model stays loaded for the next call); see orpo.chat."""
        if self._chatter is None:
            self._chatter = _Chatter(str(self.path), _remote(kwargs.pop("trust_remote_code", False)))
        args = {"system": None, "max_new_tokens": 256, "temperature": 0.0, "top_p": 0.9, "seed": 0, "stream": None, **kwargs}
        return self._chatter.reply(prompt, **args)

    def report(self) -> Path:
        """Rebuild report.html and plots/; returns the page's path."""
        return report(self.path)

    def _repr_html_(self) -> str:
        from .after.report import inline_report

        return inline_report(self.path)
