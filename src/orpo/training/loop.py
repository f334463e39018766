"""The training loop on Accelerate, top to bottom: set-up, before-eval, steps, checkpoints, after-eval, save.

`train` reads as the run goes: `set_up` (processes, data, model, optimizer, resume), the held-out metrics
before training, then one `step` after another with its log line, evaluation and checkpoint, then `end`
(held-out metrics after training, `final/`, summary.json).

One optimizer step = `gradient_accumulation_steps` micro-batches (fewer for an epoch's last step: a step never
runs past the end of an epoch, so one epoch visits every pair once). Their token and pair counts are summed
(and summed over processes) before the first backward, so each micro-batch's loss is already divided by
the whole step's counts: the accumulated gradient is the gradient of one big batch (see loss.Norm).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import Config, load_config, save_config
from ..data.doctor import load_checked
from ..data.pairs import PairSampler
from ..data.sources import DataReport, dropped_words
from ..model.load import (
    count_parameters,
    load_model,
    load_tokenizer,
    prepare_model,
    ready_tokenizer,
    save_final,
)
from . import engine
from .checkpoint import (
    NonFiniteError,
    Procs,
    TrainState,
    check_finite,
    check_output_dir,
    check_resume_config,
    list_checkpoints,
    load_checkpoint,
    prepare_output_dir,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from .heldout import evaluate_all, run_layout
from .layout import Batch, Layout
from .logps import causal_lm, check_packed, forward_logps
from .loss import Norm, add_stats, finish_metrics, orpo_loss
from .optim import make_optimizer, make_scheduler
from .tracking import MetricsLog, check_trackers, dump_json, flat_params, framework_versions

log = logging.getLogger(__name__)


@dataclass
class Given:
    """What a caller brings instead of what the config names (ORPOTrainer: the user's model, tokenizer and
    datasets); each part left None is loaded as the config says."""

    model: Any = None  # a transformers model (full precision or 4-bit) or a peft model
    tokenizer: Any = None
    rows: tuple[Any, Any] | None = None  # (train rows, eval rows or None) in memory
    lora: Any = None  # a peft LoraConfig for `model`, instead of the config's lora section
    new_token_ids: list[int] = field(default_factory=list)  # rows the caller added for ChatML (they train)


@dataclass
class Run:
    """What the loop works with, built once by `set_up`; `state` is the part that moves."""

    config: Config
    out: Path
    accelerator: Any
    procs: Procs
    checkpoint: Path | None  # the checkpoint this run resumed from
    tokenizer: Any
    train_ds: Any  # tokenized training pairs (datasets.Dataset)
    eval_ds: Any  # tokenized held-out pairs, or None
    eval_raw: Any  # held-out rows as read (task accuracy of the builtin set)
    report: DataReport
    model: Any
    optimizer: Any
    scheduler: Any
    sampler: PairSampler
    per_epoch: int  # micro-batches per epoch
    total_steps: int
    state: TrainState
    metrics_log: MetricsLog
    tokens_at_start: int  # state.tokens when this process started (a resumed run counts from there)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class Window:
    """What was trained since the last log line: summed loss statistics, tokens, steps and when it began."""

    stats: dict[str, torch.Tensor] | None = None
    tokens: int = 0
    steps: int = 0
    start: float = 0.0


def micro_batch_stream(sampler: PairSampler, dataset, start: int):
    """Endless (epoch after epoch) micro-batches of tokenized pairs, starting `start` micro-batches in."""
    per_epoch = sampler.batches_per_epoch()
    epoch, offset = divmod(start, per_epoch)
    while True:
        for indices in sampler.epoch(epoch, offset):
            yield list(dataset.select(indices))
        epoch, offset = epoch + 1, 0


def global_norm(batches: list[Batch], accelerator) -> Norm:
    """NLL-token and pair counts of the whole optimizer step, over forward passes and processes."""
    counts = torch.zeros(2, device=accelerator.device)
    for batch in batches:
        counts += torch.tensor([float(batch.nll.sum()), float(batch.pairs)], device=accelerator.device)
    counts = accelerator.reduce(counts, reduction="sum")
    return Norm(nll_tokens=float(counts[0]), pairs=float(counts[1]))


def all_finite(loss: torch.Tensor, grad_norm: torch.Tensor, accelerator) -> bool:
    """True when the step's loss and gradient norm are finite on every process (all decide alike)."""
    bad = (~torch.isfinite(loss.detach().float())).float() + (~torch.isfinite(grad_norm.detach().float())).float()
    return float(accelerator.reduce(bad.reshape(1).to(accelerator.device), reduction="sum")) == 0


def nonfinite_error(step: int, loss: torch.Tensor, grad_norm: torch.Tensor, out: Path) -> NonFiniteError:
    found = list_checkpoints(out)
    last = f"the last checkpoint is {found[-1].name}" if found else "there is no checkpoint"
    return NonFiniteError(
        f"step {step}: loss {float(loss):.4g}, gradient norm {float(grad_norm):.4g}: not finite. Training stopped before "
        f"applying this step; nothing non-finite was saved ({last}). Lower learning_rate or check the data; "
        "on_nonfinite=skip skips such steps instead"
    )


def hardware(accelerator) -> str:
    """'2 x NVIDIA H100 80GB HBM3 (FSDP)' or '2 CPU processes on 16 cores (MULTI_CPU)', for the report."""
    engine_name = str(accelerator.distributed_type).split(".")[-1]
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        what = f"{n} x {torch.cuda.get_device_name(accelerator.device)}"
    else:
        what = f"{n} {accelerator.device.type.upper()} process{'es' if n > 1 else ''} on {os.cpu_count()} cores, {torch.get_num_threads()} threads each"
    return what + (f" ({engine_name})" if n > 1 else "")


def build_model(config: Config, tokenizer, new_token_ids: list[int], given: Given, fuse: bool) -> tuple[Any, Config]:
    """(the model to train, the config it trains under): the config's model loaded, or the caller's made ready.
    A model the packed layout cannot serve stops the run, before any work; the caller's own model trains in the
    plain layout instead, with one line saying why (the config returned says layout plain)."""
    if given.model is None:
        model = load_model(config, tokenizer, new_token_ids, fuse=fuse)
    else:
        model = prepare_model(given.model, config, new_token_ids, fuse=fuse, lora=given.lora)
    if config.layout == "packed":
        try:
            check_packed(model)
        except ValueError as exc:
            if given.model is None:
                raise
            log.warning("%s: this model trains in the plain layout instead", exc)
            config = config.model_copy(update={"layout": "plain"})
    return model, config


def set_up(config: Config, given: Given | None = None) -> Run:
    """Processes, checks that need no model, data, model, optimizer and schedule, and the resumed state.
    `given`: parts the caller brings (see Given)."""
    from accelerate.utils import set_seed

    given = given or Given()
    check_trackers(config)
    out = Path(config.output_dir)
    mixed = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
    accelerator = engine.make_accelerator(mixed, config.report_to or None, str(out))  # one process, DDP, FSDP2, ZeRO
    engine.configure_engine(config, accelerator)
    procs = Procs(accelerator.process_index, accelerator.num_processes, engine.sharded(accelerator), accelerator.wait_for_everyone)
    if engine.deepspeed(accelerator):
        procs.save_state = lambda path: accelerator.save_state(str(path))
        procs.load_state = lambda path: accelerator.load_state(str(path))
    checkpoint = resolve_checkpoint(out, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    if checkpoint is not None:  # settings that change what is learned must be the checkpoint's
        saved_state = json.loads((checkpoint / "trainer_state.json").read_text())
        check_resume_config(load_config(checkpoint / "config.yaml"), config, checkpoint, saved_state["step"])
    check_output_dir(out, config.overwrite_output_dir, resuming=checkpoint is not None)  # before any work
    set_seed(config.seed)

    with accelerator.local_main_process_first():  # one process per node tokenizes (and fills caches), then the rest read
        if given.tokenizer is None:
            tokenizer, new_token_ids = load_tokenizer(config)
        else:
            tokenizer, new_token_ids = ready_tokenizer(given.tokenizer), given.new_token_ids
        train_ds, eval_ds, eval_raw, report = load_checked(config, tokenizer, given.rows)  # refuses data with errors
    read = ", ".join(f"{count:,} rows from {name}" for name, count in report.read.items())
    log.info("data: %s training pairs, %s held-out pairs (%s); dropped: %s", f"{report.train_rows:,}", f"{report.eval_rows:,}",
             read, dropped_words(report.dropped))
    if accelerator.is_main_process:  # the first write into output_dir: the config and data have passed every check
        prepare_output_dir(out, config.overwrite_output_dir, resuming=checkpoint is not None)
    if accelerator.device.type == "cuda" and given.model is None:  # will it fit? said (or refused) before the model loads
        log.info("%s", memory_check(config, train_ds, new_token_ids, accelerator))
    # Seeded again here so that LoRA's init and dropout depend on the seed only, not on how much randomness data
    # loading used (a cold tokenization cache must give the run a warm one gives).
    set_seed(config.seed)
    model, config = build_model(config, tokenizer, new_token_ids, given, engine.fusable(accelerator))
    if accelerator.is_main_process:
        save_config(config, out / "config.yaml")
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))

    sampler = PairSampler(len(train_ds), config.per_device_train_batch_size, config.seed, accelerator.process_index, accelerator.num_processes)
    per_epoch = sampler.batches_per_epoch()  # micro-batches
    steps_per_epoch = math.ceil(per_epoch / config.gradient_accumulation_steps)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = TrainState()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler, procs)
        log.info("resumed from %s at step %d", checkpoint, state.step)

    metrics_log = MetricsLog(out / "metrics.jsonl", accelerator if config.report_to else None, enabled=accelerator.is_main_process,
                             resume_step=state.step if checkpoint is not None else None)
    if config.report_to:
        accelerator.init_trackers("orpo", config=flat_params(json.loads(config.model_dump_json())))
    return Run(config, out, accelerator, procs, checkpoint, tokenizer, train_ds, eval_ds, eval_raw, report, model, optimizer,
               scheduler, sampler, per_epoch, total_steps, state, metrics_log, state.tokens)


def memory_check(config: Config, train_ds, new_token_ids: list[int], accelerator) -> str:
    """orpo plan's peak for this run beside the GPU's free memory (plan.fit_check: raises when it cannot fit)."""
    from .plan import fit_check

    free, _ = torch.cuda.mem_get_info(accelerator.device)
    name = "fsdp2" if engine.sharded(accelerator) and not engine.deepspeed(accelerator) else (
        "zero3" if engine.zero3(accelerator) else "zero2" if engine.deepspeed(accelerator) else "ddp")
    return fit_check(config, train_ds, len(new_token_ids), torch.cuda.get_device_name(accelerator.device), free,
                     accelerator.num_processes, name)


def evaluate(run: Run, label: str, generate: bool = True) -> dict:
    """Held-out metrics now, written to metrics.jsonl as `eval_*` at the current step."""
    metrics = evaluate_all(run.config, run.model, run.tokenizer, run.eval_ds, run.eval_raw, run.accelerator, label, generate)
    run.metrics_log.write(run.state.step, {f"eval_{k}": v for k, v in metrics.items() if k != "samples"})
    return metrics


def before_training(run: Run) -> dict:
    """{'before': held-out metrics} at step 0 when eval_on_start; a resumed run reads those of its first start."""
    before = run.out / "eval_before.json"  # kept for a resumed run's summary
    if run.eval_ds is not None and run.config.eval_on_start and run.state.step == 0:
        metrics = evaluate(run, "before")
        if run.main:
            dump_json(metrics, before)
        return {"before": metrics}
    if run.checkpoint is not None and before.is_file():
        return {"before": json.loads(before.read_text())}
    return {}


def step(run: Run, stream, layout: Layout, spare: Batch, bar) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor, int]:
    """One optimizer step: its micro-batches' forward and backward passes, clipping, and the update (or, when the
    loss or gradient is not finite, a stop or a skip). Returns the step's summed statistics (None when skipped),
    its gradient norm and the tokens this process trained on."""
    config, accelerator, state, model = run.config, run.accelerator, run.state, run.model
    # The step's micro-batches, in sampler order; never past an epoch's end (its last step may be short).
    take = min(config.gradient_accumulation_steps, run.per_epoch - state.micro_batches % run.per_epoch)
    groups = [next(stream) for _ in range(take)]
    batches = [b.to(accelerator.device) for b in layout.batches(groups)]  # forward passes
    live = len(batches)  # passes of this process's own pairs; then zero-weight ones where the engine needs them
    batches += [spare] * (engine.passes(live, accelerator) - live)
    norm = global_norm(batches[:live], accelerator)
    step_loss, step_stats = torch.zeros((), device=accelerator.device), None
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            logps = forward_logps(model, batch, config.logps_chunk_size)  # (2b, W)
            loss, stats = orpo_loss(logps, batch.response, batch.nll, config.beta, norm)
        if i >= live:  # keeps this process in step with the others; adds nothing to the gradient or the metrics
            loss, stats = loss * 0, {k: v * 0 for k, v in stats.items()}
        # DDP, FSDP2 and DeepSpeed average gradients over processes; the loss is already a global mean: undo that.
        engine.backward(accelerator, loss * accelerator.num_processes, last)
        step_loss, step_stats = step_loss + loss.detach(), add_stats(step_stats, stats)
    # Clipping at inf when off: the norm is still measured (logged, and checked below), the gradient unchanged.
    grad_norm = engine.plain(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf))
    state.step += 1
    applied = all_finite(step_loss, grad_norm, accelerator)
    if applied:
        run.optimizer.step()
    elif config.on_nonfinite == "stop":
        bar.close()  # the error line goes below the bar, not into it
        raise nonfinite_error(state.step, step_loss, grad_norm, run.out)
    else:
        state.skipped_steps += 1
        log.warning("step %d skipped: loss %.4g, gradient norm %.4g (on_nonfinite=skip)", state.step, float(step_loss), float(grad_norm))
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.micro_batches += len(groups)
    step_tokens = sum(b.tokens for b in batches[:live])
    state.tokens += step_tokens
    return step_stats if applied else None, grad_norm, step_tokens


def log_window(run: Run, window: Window, grad_norm: torch.Tensor, bar) -> None:
    """One metrics line for the steps since the last one: the window's metrics (summed over processes), the
    learning rate, this step's gradient norm, throughput."""
    accelerator = run.accelerator
    elapsed = time.perf_counter() - window.start
    all_tokens = float(accelerator.reduce(torch.tensor(float(window.tokens), device=accelerator.device), reduction="sum"))
    stats = window.stats
    values = finish_metrics({k: accelerator.reduce(v, reduction="sum") for k, v in stats.items()}, run.config.beta) if stats else {}
    values.update(
        learning_rate=run.scheduler.get_last_lr()[0],
        grad_norm=float(grad_norm),  # sync point
        epoch=run.state.micro_batches / run.per_epoch,
        tokens_per_second=all_tokens / max(elapsed, 1e-9),
        seconds_per_step=elapsed / window.steps,
        skipped_steps=run.state.skipped_steps,
    )
    run.metrics_log.write(run.state.step, values)
    if stats:
        bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['rewards/accuracies']:.2f}", tok_s=f"{values['tokens_per_second']:.0f}")


def end(run: Run, summary: dict, started: float, finish: Callable[[Path], None] | None) -> dict:
    """Held-out metrics after training, then (main process) final/, summary.json and `finish`; returns the summary."""
    accelerator, state, model = run.accelerator, run.state, run.model
    if run.eval_ds is not None:
        summary["after"] = evaluate(run, "after")
    tokens = int(accelerator.reduce(torch.tensor(float(state.tokens - run.tokens_at_start), device=accelerator.device), reduction="sum"))
    accelerator.wait_for_everyone()
    gathered = engine.full_state(model, accelerator, trained_only=run.config.lora.enabled)  # sharded weights: whole on main
    if run.main:
        check_finite(accelerator.unwrap_model(model), "final/", state=gathered)
        summary["final_model"] = str(save_final(accelerator.unwrap_model(model), run.tokenizer, run.out / "final", gathered))
        summary["steps"] = state.step
        summary["skipped_steps"] = state.skipped_steps
        summary["tokens"] = tokens  # this run's tokens (a resumed run: since it resumed), over every process
        summary["wall_seconds"] = round(time.perf_counter() - started, 1)
        summary["hardware"] = hardware(accelerator)
        if accelerator.device.type == "cuda":  # this process's peak, the figure to size a GPU by
            summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
        summary["versions"] = framework_versions()
        dump_json(summary, run.out / "summary.json")
        if finish is not None:
            finish(run.out)  # what later stages add to a finished run (orpo train: report.html, final/README.md)
    run.metrics_log.close()
    accelerator.wait_for_everyone()  # every process leaves together, after main has written final/ ...
    accelerator.end_training()  # ... then trackers finish and the process group goes: a process that exits with
    # its gloo group still up can abort ("terminate called without an active exception")
    return summary


def train(config: Config, finish: Callable[[Path], None] | None = None, given: Given | None = None) -> dict:
    """Run one ORPO training job described by `config`; returns the summary written to summary.json.

    `finish(run_dir)` runs on the main process once final/ and summary.json are written: `orpo train` passes
    after.card.finish_run (report.html, plots/, final/README.md), which this stage may not import.
    `given`: parts the caller brings instead of loading them from the config (see Given)."""
    started = time.perf_counter()
    return fit(set_up(config, given), finish, started)


def fit(run: Run, finish: Callable[[Path], None] | None = None, started: float | None = None) -> dict:
    """Train a set-up run to its last step, evaluate and save it (train, after set_up); returns the summary.
    `started`: when the job began (perf_counter), for the summary's wall time; default now."""
    started = time.perf_counter() if started is None else started
    config, state = run.config, run.state
    summary: dict = {"data": run.report.as_dict(), "total_steps": run.total_steps, **before_training(run)}

    layout = run_layout(config, run.model, run.tokenizer, config.per_device_train_batch_size, run.accelerator.device)
    kernel = causal_lm(run.model).config._attn_implementation
    log.info("layout: %s (%s; attention %s)", config.layout, f"{layout.max_tokens} tokens per pass" if layout.kind == "packed" else "one pass per micro-batch", kernel)
    stream = micro_batch_stream(run.sampler, run.train_ds, state.micro_batches)
    spare = layout.batches([[run.train_ds[0]]])[0].to(run.accelerator.device)  # for zero-weight passes (engine.passes)
    eval_every = config.eval_interval(run.total_steps)
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step", disable=not run.accelerator.is_local_main_process)
    window = Window(start=time.perf_counter())
    while state.step < run.total_steps:
        stats, grad_norm, tokens = step(run, stream, layout, spare, bar)
        if stats is not None:  # None: a skipped step (on_nonfinite=skip) adds nothing to the metrics
            window.stats = add_stats(window.stats, stats)
        window.tokens, window.steps = window.tokens + tokens, window.steps + 1
        bar.update(1)

        logged = state.step % config.logging_steps == 0 or state.step in (1, run.total_steps)  # step 1: the warm-up's start
        if logged:
            log_window(run, window, grad_norm, bar)
            window = Window(start=window.start)
        if run.eval_ds is not None and eval_every and state.step % eval_every == 0 and state.step < run.total_steps:
            evaluate(run, f"step {state.step}", generate=False)
        if config.save_steps and state.step % config.save_steps == 0 and state.step < run.total_steps:
            save_checkpoint(run.out, run.accelerator.unwrap_model(run.model), run.optimizer, run.scheduler, state, config, run.procs)  # every process
            if run.main:
                prune_checkpoints(run.out, config.save_total_limit)
        if logged:  # a log step just closed the window: time from here, not counting eval or saving
            window.start = time.perf_counter()
    bar.close()
    return end(run, summary, started, finish)
