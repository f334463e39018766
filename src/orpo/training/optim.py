"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import torch

from ..config import Config


def param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters; matrices decay, biases and norm weights do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(config: Config, model) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay)
    kwargs = {"lr": config.learning_rate, "betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}
    if config.optim in ("adamw_torch", "adamw_torch_fused"):
        fused = config.optim == "adamw_torch_fused" and all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, **kwargs, fused=fused or None)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(f"optim={config.optim} needs bitsandbytes: pip install 'orpo[qlora]'") from exc
    if config.optim == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return bnb.optim.PagedAdamW8bit(groups, **kwargs)


def warmup_steps(config: Config, total_steps: int) -> int:
    if config.warmup_steps > 0:
        return config.warmup_steps
    return int(round(config.warmup_ratio * total_steps))


def make_scheduler(config: Config, optimizer, total_steps: int):
    """Linear warm-up, then linear/cosine decay to 0, constant, or 1/sqrt(step) (transformers' schedules)."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler_type == "constant" else config.lr_scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(config, total_steps), num_training_steps=total_steps)
