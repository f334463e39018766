"""`orpo eval`: held-out metrics of a run, a merged model or a base model, alone or side by side.

The held-out split is rebuilt from the run's config (`data.pairs.load_pairs`), and the metrics come from
`training.heldout.evaluate_all`, the function training used for summary.json's `before`/`after`: for a finished run
the numbers equal summary.json's `after`; for its base model (LoRA B = 0 at step 0) they equal `before`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import load_config
from ..data.pairs import load_pairs, to_messages
from ..training.heldout import HELD_OUT_ROWS, change_cell, format_metric, generate_replies, metric_cell
from .runs import Target, load, resolve

log = logging.getLogger(__name__)


def evaluate_target(target: Target, samples: int = 8, generate: bool = True, harness: dict | None = None) -> dict:
    """Metrics of one target on its config's held-out split, plus up to `samples` generations; with `harness`
    ({tasks, include_path, limit}), lm-evaluation-harness results under "lm_eval"."""
    from accelerate import Accelerator

    from ..training.heldout import evaluate_all

    config = target.config
    mixed = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
    accelerator = Accelerator(mixed_precision=mixed)
    model, tokenizer = load(target)
    model.to(accelerator.device)
    _, eval_ds, eval_raw, _ = load_pairs(config, tokenizer)
    if eval_ds is None:
        raise ValueError(f"{target.spec}: no held-out data (set data.test_size > 0 or data.eval_path, or pass --data)")
    metrics = evaluate_all(config, model, tokenizer, eval_ds, eval_raw, accelerator, target.spec, generate=generate)
    if generate and not config.data.builtin and samples > 0:
        rows = [eval_raw[i] for i in range(min(samples, len(eval_raw)))]
        prompts = [to_messages(r)["prompt"] for r in rows]
        replies = generate_replies(
            model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, batch_size=config.per_device_eval_batch_size,
            device=accelerator.device,
        )
        metrics["samples"] = [{"prompt": p[-1]["content"], "reply": r} for p, r in zip(prompts, replies, strict=True)]
    metrics["samples"] = metrics.get("samples", [])[:samples]
    if harness:
        from .harness import run_tasks

        metrics["lm_eval"] = run_tasks(model, tokenizer, batch_size=config.per_device_eval_batch_size, **harness)
    return metrics


def table(names: list[str], results: list[dict]) -> str:
    """Metric rows, one column per model, and the change from the first to the last column."""
    width = max(16, *(len(n) + 2 for n in names))
    head = f"{'held-out metric':<24}" + "".join(f"{n:>{width}}" for n in names)
    lines = [head + (f"{'change':>18}" if len(results) > 1 else "")]
    for label, key, pct in HELD_OUT_ROWS:
        if all(r.get(key) is None for r in results):
            continue
        line = f"{label:<24}" + "".join(f"{metric_cell(r, key, pct):>{width}}" for r in results)
        if len(results) > 1:
            line += f"{change_cell(results[0], results[-1], key, pct):>18}"
        lines.append(line.rstrip())
    if any("rewards/accuracies_se" in r for r in results):
        lines.append("(± one binomial standard error; for a change, the two combined)")
    return "\n".join(lines)


def samples_text(names: list[str], results: list[dict]) -> str:
    """Generations per prompt, one line per model (the prompts are the same for every model)."""
    lines = []
    for i, first in enumerate(results[0].get("samples", [])):
        lines.append(f"\n[{i + 1}] {first['prompt']}")
        for name, result in zip(names, results, strict=True):
            if i < len(result.get("samples", [])):
                s = result["samples"][i]
                mark = "" if "correct" not in s else (" [correct]" if s["correct"] else " [wrong]")
                lines.append(f"    {name}: {s['reply']!r}{mark}")
    return "\n".join(lines)


def summary_check(target: Target, metrics: dict) -> str | None:
    """For a run: how far these numbers are from summary.json's `after` (the end-of-training evaluation)."""
    path = Path(target.spec) / "summary.json"
    if target.kind != "run" or not path.is_file():
        return None
    trained = load_config(Path(target.spec) / "config.yaml")
    same = ("data", "max_length", "max_prompt_length", "beta", "nll_on_prompt")
    if target.config.model_dump(include=set(same)) != trained.model_dump(include=set(same)):
        return "(not compared with summary.json: these numbers come from other data or settings than the run's own evaluation)"
    after = json.loads(path.read_text()).get("after", {})
    keys = [k for k, v in after.items() if isinstance(v, float) and isinstance(metrics.get(k), float)]
    if not keys:
        return None
    worst = max(abs(metrics[k] - after[k]) for k in keys)
    return f"summary.json 'after' vs now: max |difference| over {len(keys)} metrics = {worst:.2e}"


def harness_table(names: list[str], results: list[dict]) -> str:
    """lm-evaluation-harness metrics, one column per model."""
    lines = [f"{'lm-eval task/metric':<32}" + "".join(f"{n:>16}" for n in names)]
    for task, values in results[0]["lm_eval"].items():
        for metric in values:
            cells = [r["lm_eval"].get(task, {}).get(metric) for r in results]
            lines.append(f"{task + '/' + metric:<32}" + "".join(f"{format_metric(c, False):>16}" for c in cells))
    return "\n".join(lines)


def evaluate_targets(spec: str, overrides: list[str], data: str | None = None, compare: str | None = None, samples: int = 4,
                     generate: bool = True, harness: dict | None = None) -> dict[str, dict]:
    """{name: metrics} of `spec` and, first, of `compare` (a base model is measured on the same split); `data`
    sets data.path, `overrides` are key=value items."""
    if data is not None:
        overrides = [f"data.path={data}", *overrides]
    target = resolve(spec, overrides)
    targets = [target]
    if compare is not None:
        targets.insert(0, resolve(compare, like=target.config))  # a base model is measured on the same split
    return {t.spec: evaluate_target(t, samples, generate, harness) for t in targets}


def results_text(spec: str, overrides: list[str], data: str | None, results: dict[str, dict], harness: bool) -> str:
    """What `orpo eval` prints for evaluate_targets' results (same arguments): the table, lm-eval's, the
    comparison with summary.json, generation samples."""
    names, values = list(results), list(results.values())
    parts = ["\n" + table(names, values)]
    if harness:
        parts.append("\n" + harness_table(names, values))
    check = summary_check(resolve(spec, ([f"data.path={data}"] if data is not None else []) + list(overrides)), values[-1])
    if check:
        parts.append(check)
    if any(r.get("samples") for r in values):
        parts.append("\ngeneration samples (greedy):" + samples_text(names, values))
    return "\n".join(parts)
