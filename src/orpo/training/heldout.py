"""Held-out metrics: preference metrics through the training loss, and task accuracy by greedy generation.

`evaluate_all` is what the loop runs before, during and after training, and what `orpo eval` runs on a
finished run, so both report the same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data.pairs import prompt_ids
from ..model.fast.attention import use_split
from . import engine
from .layout import Layout, make_layout, pair_length
from .logps import causal_lm, forward_logps
from .loss import Norm, add_stats, finish_metrics, orpo_loss, response_means

log = logging.getLogger(__name__)
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes (identity on one process)

# Held-out metrics as tables show them (CLI, report, model card): (label, metric key, shown as a percentage).
HELD_OUT_ROWS = [
    ("preference accuracy", "rewards/accuracies", True),
    ("length-balanced accuracy", "length_balanced_accuracy", True),
    ("  chosen longer", "accuracy_chosen_longer", True),
    ("  chosen shorter", "accuracy_chosen_shorter", True),
    ("task accuracy", "task_accuracy", True),
    ("margin (reward)", "rewards/margins", False),
    ("log-odds chosen", "log_odds_chosen", False),
    ("log-odds ratio term", "log_odds_ratio", False),
    ("loss", "loss", False),
    ("NLL (chosen)", "nll_loss", False),
    ("logp chosen / token", "logps/chosen", False),
    ("logp rejected / token", "logps/rejected", False),
]


def format_metric(value, pct: bool, se: float | None = None) -> str:
    """'87.5%' for shares ('87.5% ± 3.0' with a standard error), '0.3388' otherwise, '-' when missing."""
    if not isinstance(value, (int, float)):
        return "-"
    if not pct:
        return f"{value:.4f}"
    return f"{100 * value:.1f}%" + (f" ± {100 * se:.1f}" if isinstance(se, (int, float)) else "")


def standard_error(share: float, n: int) -> float:
    """The binomial standard error of a share measured on n items: sqrt(p (1 - p) / n). It is 0 at p = 0 or 1,
    where it understates the uncertainty of a small set."""
    return math.sqrt(share * (1 - share) / n) if n > 0 else float("nan")


def metric_cell(result: dict, key: str, pct: bool) -> str:
    """A table cell: the metric with its standard error (`KEY_se`) when the result has one, and the pairs it was
    measured on (`KEY_n`) when they are a part of the set."""
    cell = format_metric(result.get(key), pct, result.get(f"{key}_se"))
    n = result.get(f"{key}_n")
    return cell + (f" (n={n})" if isinstance(n, int) else "")


def length_stats(logps: torch.Tensor, response: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums for the length-balanced accuracy of one batch laid out as [chosen; rejected]: the pairs whose chosen
    response is longer (in tokens) than the rejected one, the pairs where it is shorter, and in each group how
    many rank chosen above rejected by the accuracy's own test (higher mean log-prob per token)."""
    mean, length = response_means(logps, response)  # (2B,), (2B,)
    half = mean.shape[0] // 2
    right = mean[:half] > mean[half:]  # (B,)
    longer, shorter = length[:half] > length[half:], length[:half] < length[half:]  # (B,), (B,)
    return {"length/longer": longer.sum().float(), "length/longer_right": (right & longer).sum().float(),
            "length/shorter": shorter.sum().float(), "length/shorter_right": (right & shorter).sum().float()}


def length_balanced(sums: dict[str, float], pairs: int) -> dict:
    """Accuracy on the pairs whose chosen response is the longer and on those where it is the shorter, each with
    its count and standard error, and their mean: the length-balanced accuracy, which a model that only learned
    "shorter (or longer) is likelier" scores 50% on. None where a group is empty (the mean is then undefined).
    The standard error of the mean is half the two combined (independent groups)."""
    out: dict = {}
    for side in ("longer", "shorter"):
        n = int(sums[f"length/{side}"])
        share = sums[f"length/{side}_right"] / n if n else None
        out[f"accuracy_chosen_{side}"] = share
        out[f"accuracy_chosen_{side}_se"] = standard_error(share, n) if n else None
        out[f"accuracy_chosen_{side}_n"] = n
    a, b = out["accuracy_chosen_longer"], out["accuracy_chosen_shorter"]
    both = a is not None and b is not None
    out["length_balanced_accuracy"] = (a + b) / 2 if both else None
    out["length_balanced_accuracy_se"] = math.hypot(out["accuracy_chosen_longer_se"], out["accuracy_chosen_shorter_se"]) / 2 if both else None
    out["pairs_same_length"] = pairs - out["accuracy_chosen_longer_n"] - out["accuracy_chosen_shorter_n"]
    return out


def change_cell(before: dict, after: dict, key: str, pct: bool) -> str:
    """'+47.5 pt ± 5.2' (the standard error of the difference, the two taken as independent: conservative for the
    same pairs measured twice), '+0.1234' for other metrics, '' when either side is missing."""
    b, a = before.get(key), after.get(key)
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return ""
    if not pct:
        return f"{a - b:+.4f}"
    ses = [before.get(f"{key}_se"), after.get(f"{key}_se")]
    spread = f" ± {100 * math.hypot(*ses):.1f}" if all(isinstance(v, (int, float)) for v in ses) else ""
    return f"{100 * (a - b):+.1f} pt{spread}"


def shard(n: int, rank: int, world: int) -> list[int]:
    """Row indices this process handles."""
    return list(range(rank, n, world))


@torch.no_grad()
def preference_metrics(
    model,
    dataset,
    *,
    beta: float,
    layout: Layout,
    batch_size: int,
    device: torch.device,
    chunk: int | None = None,
    rank: int = 0,
    world: int = 1,
    reduce: Reduce = lambda t: t,
    passes: Callable[[int], int] = lambda n: n,
    autocast=None,
    show_progress: bool = True,
) -> dict[str, float]:
    """TRL-named ORPO metrics over a whole tokenized dataset, normalised over all of it (exact means).

    Groups of `batch_size` pairs go through `layout`; the packed layout takes them shortest first (sums do
    not depend on the order), so pairs of similar length share passes. Each of `world` processes scores its
    share of the pairs; `passes(n)` is how many forward passes a process with n runs (engine.passes: with
    sharded weights every process runs as many as the busiest, the extra ones weighing nothing).
    """
    if len(dataset) == 0:
        raise ValueError("evaluation set is empty")
    was_training = model.training
    model.eval()
    records = list(dataset.select(shard(len(dataset), rank, world)))
    if layout.kind == "packed":
        records.sort(key=pair_length)
    groups = [records[start : start + batch_size] for start in range(0, len(records), batch_size)]
    own = sum(layout.passes([g]) for g in groups)
    idle = passes(own) - own
    spare = layout.batches([[dataset[0]]])[0] if idle else None  # the pair of the zero-weight passes
    total = None
    with tqdm(total=len(records), desc="eval", unit="pair", leave=False, disable=not show_progress) as bar:
        for group in [*groups, *[None] * idle]:
            for batch in layout.batches([group]) if group else [spare]:  # None: a zero-weight pass
                batch = batch.to(device)
                with autocast() if autocast else torch.autocast("cpu", enabled=False):
                    logps = forward_logps(model, batch, chunk)
                _, stats = orpo_loss(logps, batch.response, batch.nll, beta, Norm(1.0, 1.0))
                stats |= length_stats(logps, batch.response)
                total = add_stats(total, stats if group else {k: v * 0 for k, v in stats.items()})
            bar.update(len(group or []))
    model.train(was_training)
    total = {k: reduce(v) for k, v in total.items()}
    metrics = finish_metrics(total, beta)
    metrics["pairs"] = int(total["pairs"])
    metrics["rewards/accuracies_se"] = standard_error(metrics["rewards/accuracies"], metrics["pairs"])
    metrics |= length_balanced({k: float(v) for k, v in total.items() if k.startswith("length/")}, metrics["pairs"])
    return metrics


@torch.no_grad()
def generate_replies(
    model, tokenizer, prompts: list[list[dict[str, str]]], *, max_new_tokens: int, batch_size: int, device, show_progress=True
) -> list[str]:
    """Greedy replies to chat prompts (message lists), decoded without special tokens."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False, disable=not show_progress):
            ids = prompt_ids(tokenizer, prompts[start : start + batch_size])  # as training saw them (BOS too)
            enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)  # left padding
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]  # (b, new)
            replies.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def task_accuracy(model, tokenizer, rows: list[dict], check, *, max_new_tokens: int, batch_size: int, device, show_progress=True):
    """Share of rows whose greedy reply to `row["prompt"]` (a message list) passes `check(row, reply)`;
    also returns (row, reply, ok) for every row."""
    prompts = [r["prompt"] for r in rows]
    replies = generate_replies(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, show_progress=show_progress
    )
    results = [(row, reply, bool(check(row, reply))) for row, reply in zip(rows, replies, strict=True)]
    return sum(ok for _, _, ok in results) / max(len(results), 1), results


def run_layout(config: Config, model, tokenizer, batch_size: int, device):
    """The config's layout for this model (its attention kernel) and device."""
    lm = causal_lm(model)
    kernel = use_split(lm.config, device) if config.layout == "packed" else lm.config._attn_implementation
    return make_layout(config, tokenizer.pad_token_id, batch_size, device, kernel)


def evaluate_all(config: Config, model, tokenizer, eval_ds, eval_raw, accelerator, label: str, generate: bool = True) -> dict[str, float]:
    """Preference metrics on the held-out pairs, plus task accuracy for the builtin set (when `generate`)."""
    metrics = preference_metrics(
        model,
        eval_ds,
        beta=config.beta,
        layout=run_layout(config, model, tokenizer, config.per_device_eval_batch_size, accelerator.device),
        batch_size=config.per_device_eval_batch_size,
        device=accelerator.device,
        chunk=config.logps_chunk_size,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        reduce=lambda t: accelerator.reduce(t.to(accelerator.device), reduction="sum"),
        passes=lambda n: engine.passes(n, accelerator),
        autocast=accelerator.autocast,
        show_progress=accelerator.is_local_main_process,
    )
    if generate and config.data.builtin:
        from ..data.builtin_tasks import check

        acc, samples = task_accuracy(
            accelerator.unwrap_model(model),
            tokenizer,
            list(eval_raw),
            check,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.per_device_eval_batch_size,
            device=accelerator.device,
            show_progress=accelerator.is_local_main_process,
        )
        metrics["task_accuracy"] = acc
        metrics["task_accuracy_se"] = standard_error(acc, len(eval_raw))
        metrics["samples"] = [{"prompt": r["prompt"][-1]["content"], "reply": reply, "correct": ok} for r, reply, ok in samples[:8]]
    log.info("%s eval: %s", label, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return metrics
