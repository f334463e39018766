"""The training loop on Accelerate, top to bottom: set-up, before-eval, steps, checkpoints, after-eval, save.

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
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..after.card import framework_versions, write_card
from ..after.report import dropped_words, write_report
from ..config import Config, load_config, save_config
from ..data.doctor import load_checked
from ..data.pairs import PairSampler
from ..model.fast.attention import use_split
from ..model.load import count_parameters, load_model, load_tokenizer, save_final
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
from .heldout import preference_metrics, task_accuracy
from .layout import Batch, make_layout
from .logps import causal_lm, check_packed, forward_logps
from .loss import Norm, add_stats, finish_metrics, orpo_loss
from .optim import make_optimizer, make_scheduler
from .tracking import MetricsLog, check_trackers, dump_json, flat_params

log = logging.getLogger(__name__)


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
        metrics["samples"] = [{"prompt": r["prompt"][-1]["content"], "reply": reply, "correct": ok} for r, reply, ok in samples[:8]]
    log.info("%s eval: %s", label, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return metrics


def hardware(accelerator) -> str:
    """'2 x NVIDIA H100 80GB HBM3 (FSDP)' or '2 CPU processes on 16 cores (MULTI_CPU)', for the report."""
    engine_name = str(accelerator.distributed_type).split(".")[-1]
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        what = f"{n} x {torch.cuda.get_device_name(accelerator.device)}"
    else:
        what = f"{n} {accelerator.device.type.upper()} process{'es' if n > 1 else ''} on {os.cpu_count()} cores, {torch.get_num_threads()} threads each"
    return what + (f" ({engine_name})" if n > 1 else "")


def train(config: Config) -> dict:
    """Run one ORPO training job described by `config`; returns the summary written to summary.json."""
    from accelerate.utils import set_seed

    started = time.perf_counter()
    check_trackers(config)
    out = Path(config.output_dir)
    mixed = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
    accelerator = engine.make_accelerator(mixed, config.report_to or None, str(out))  # one process, DDP, FSDP2, ZeRO
    main = accelerator.is_main_process
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
        tokenizer, new_token_ids = load_tokenizer(config)
        train_ds, eval_ds, eval_raw, report = load_checked(config, tokenizer)  # refuses data with errors
    read = ", ".join(f"{count:,} rows from {name}" for name, count in report.read.items())
    log.info("data: %s training pairs, %s held-out pairs (%s); dropped: %s", f"{report.train_rows:,}", f"{report.eval_rows:,}",
             read, dropped_words(report.dropped))
    if main:  # the first write into output_dir: the config and data have passed every check
        prepare_output_dir(out, config.overwrite_output_dir, resuming=checkpoint is not None)
        save_config(config, out / "config.yaml")
    # Seeded again here so that LoRA's init and dropout depend on the seed only, not on how much randomness data
    # loading used (a cold tokenization cache must give the run a warm one gives).
    set_seed(config.seed)
    model = load_model(config, tokenizer, new_token_ids, fuse=engine.fusable(accelerator))
    if config.layout == "packed":
        check_packed(model)  # a model the packed layout cannot serve stops here, before any work
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

    metrics_log = MetricsLog(out / "metrics.jsonl", accelerator if config.report_to else None, enabled=main,
                             resume_step=state.step if checkpoint is not None else None)
    if config.report_to:
        accelerator.init_trackers("orpo", config=flat_params(json.loads(config.model_dump_json())))
    summary: dict = {"data": report.as_dict(), "total_steps": total_steps}
    eval_every = config.eval_interval(total_steps)
    before = out / "eval_before.json"  # kept for a resumed run's summary
    if eval_ds is not None and config.eval_on_start and state.step == 0:
        summary["before"] = evaluate_all(config, model, tokenizer, eval_ds, eval_raw, accelerator, "before")
        metrics_log.write(0, {f"eval_{k}": v for k, v in summary["before"].items() if k != "samples"})
        if main:
            dump_json(summary["before"], before)
    elif checkpoint is not None and before.is_file():
        summary["before"] = json.loads(before.read_text())

    layout = run_layout(config, model, tokenizer, config.per_device_train_batch_size, accelerator.device)
    kernel = causal_lm(model).config._attn_implementation
    log.info("layout: %s (%s; attention %s)", config.layout, f"{layout.max_tokens} tokens per pass" if layout.kind == "packed" else "one pass per micro-batch", kernel)
    stream = micro_batch_stream(sampler, train_ds, state.micro_batches)
    tokens_at_start = state.tokens
    spare = layout.batches([[train_ds[0]]])[0].to(accelerator.device)  # for zero-weight passes (engine.passes)
    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not accelerator.is_local_main_process)
    window, window_tokens, window_steps, window_start = None, 0, 0, time.perf_counter()
    while state.step < total_steps:
        # The step's micro-batches, in sampler order; never past an epoch's end (its last step may be short).
        take = min(config.gradient_accumulation_steps, per_epoch - state.micro_batches % per_epoch)
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
        if all_finite(step_loss, grad_norm, accelerator):
            optimizer.step()
            window = add_stats(window, step_stats)
        elif config.on_nonfinite == "stop":
            bar.close()  # the error line goes below the bar, not into it
            raise nonfinite_error(state.step, step_loss, grad_norm, out)
        else:
            state.skipped_steps += 1
            log.warning("step %d skipped: loss %.4g, gradient norm %.4g (on_nonfinite=skip)", state.step, float(step_loss), float(grad_norm))
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.micro_batches += len(groups)
        step_tokens = sum(b.tokens for b in batches[:live])
        state.tokens += step_tokens
        window_tokens, window_steps = window_tokens + step_tokens, window_steps + 1
        bar.update(1)

        logged = state.step % config.logging_steps == 0 or state.step in (1, total_steps)  # step 1: the warm-up's start
        if logged:
            elapsed = time.perf_counter() - window_start
            all_tokens = float(accelerator.reduce(torch.tensor(float(window_tokens), device=accelerator.device), reduction="sum"))
            values = finish_metrics({k: accelerator.reduce(v, reduction="sum") for k, v in window.items()}, config.beta) if window else {}
            values.update(
                learning_rate=scheduler.get_last_lr()[0],
                grad_norm=float(grad_norm),  # sync point
                epoch=state.micro_batches / per_epoch,
                tokens_per_second=all_tokens / max(elapsed, 1e-9),
                seconds_per_step=elapsed / window_steps,
                skipped_steps=state.skipped_steps,
            )
            metrics_log.write(state.step, values)
            if window:
                bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['rewards/accuracies']:.2f}", tok_s=f"{values['tokens_per_second']:.0f}")
            window, window_tokens, window_steps = None, 0, 0
        if eval_ds is not None and eval_every and state.step % eval_every == 0 and state.step < total_steps:
            metrics = evaluate_all(config, model, tokenizer, eval_ds, eval_raw, accelerator, f"step {state.step}", generate=False)
            metrics_log.write(state.step, {f"eval_{k}": v for k, v in metrics.items() if k != "samples"})
        if config.save_steps and state.step % config.save_steps == 0 and state.step < total_steps:
            save_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler, state, config, procs)  # every process
            if main:
                prune_checkpoints(out, config.save_total_limit)
        if logged:  # a log step just closed the window: time from here, not counting eval or saving
            window_start = time.perf_counter()
    bar.close()

    if eval_ds is not None:
        summary["after"] = evaluate_all(config, model, tokenizer, eval_ds, eval_raw, accelerator, "after")
        metrics_log.write(state.step, {f"eval_{k}": v for k, v in summary["after"].items() if k != "samples"})
    tokens = int(accelerator.reduce(torch.tensor(float(state.tokens - tokens_at_start), device=accelerator.device), reduction="sum"))
    accelerator.wait_for_everyone()
    gathered = engine.full_state(model, accelerator, trained_only=config.lora.enabled)  # sharded weights: whole on main
    if main:
        check_finite(accelerator.unwrap_model(model), "final/", state=gathered)
        summary["final_model"] = str(save_final(accelerator.unwrap_model(model), tokenizer, out / "final", gathered))
        summary["steps"] = state.step
        summary["skipped_steps"] = state.skipped_steps
        summary["tokens"] = tokens  # this run's tokens (a resumed run: since it resumed), over every process
        summary["wall_seconds"] = round(time.perf_counter() - started, 1)
        summary["hardware"] = hardware(accelerator)
        summary["versions"] = framework_versions()
        dump_json(summary, out / "summary.json")
        write_report(out)  # report.html + plots/*.png from metrics.jsonl and summary.json
        write_card(out / "final")  # final/README.md: the model card `orpo push` uploads
    metrics_log.close()
    if config.report_to:
        accelerator.end_training()
    return summary
