"""Optimizer and learning-rate schedule of the paper's recipe (pre-training: Table 8)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError, OptimConfig, TrainConfig


def scaled_lr(cfg: OptimConfig, effective_batch: int) -> float:
    """Absolute peak lr: ``cfg.lr`` if set, else ``base_lr * effective_batch / 256`` (linear scaling rule)."""
    return cfg.lr if cfg.lr is not None else cfg.base_lr * effective_batch / 256


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_names: Iterable[str] = (),
    lr_scale: Callable[[str], float] | None = None,
) -> list[dict]:
    """AdamW parameter groups: no weight decay on 1-D parameters (norms, biases) and on ``no_decay_names``
    (cls/mask tokens, position embeddings). ``lr_scale(name)`` adds an ``lr_scale`` per group (layer decay)."""
    skip = set(no_decay_names)
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        scale = lr_scale(name) if lr_scale is not None else 1.0
        key = (decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_adamw(groups: list[dict], cfg: OptimConfig, lr: float, device: torch.device,
                betas: tuple[float, float] | None = None) -> torch.optim.AdamW:
    """torch AdamW; the fused CUDA kernel where available (``cfg.fused``: auto | on | off)."""
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "on"
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    for g in clean:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return torch.optim.AdamW(clean, lr=lr, betas=betas or (cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then half-cosine
    to ``min_ratio`` (official ``adjust_learning_rate``, evaluated per step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule; each group keeps its own ``lr_scale`` because LambdaLR multiplies its initial lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, min_ratio)
    )


@dataclass(frozen=True)
class StepPlan:
    """How a run's epochs map to optimizer steps (shared by pre-training, fine-tuning and probing)."""

    grad_accum: int  # micro batches per optimizer step on each rank
    micro_per_epoch: int  # micro batches per epoch on each rank (the loader's length)
    steps_per_epoch: float
    total_steps: int  # the schedule's length: train.epochs at full length
    budget: int  # steps this run takes (train.steps bounds it without changing the schedule)
    warmup_steps: int


def plan_steps(t_cfg: TrainConfig, o_cfg: OptimConfig, micro_batch: int, world_size: int,
               micro_per_epoch: int) -> StepPlan:
    """Effective batch = micro batch x accumulation x ranks; refuse an effective batch that does not divide."""
    per_step = micro_batch * world_size
    if t_cfg.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size={t_cfg.batch_size} (effective) is not a multiple of data.batch_size x ranks "
            f"= {micro_batch} x {world_size}; choose an effective batch divisible by {per_step}"
        )
    grad_accum = t_cfg.batch_size // per_step
    steps_per_epoch = micro_per_epoch / grad_accum
    total = max(1, math.floor(t_cfg.epochs * steps_per_epoch))
    budget = min(total, t_cfg.steps) if t_cfg.steps else total
    return StepPlan(grad_accum, micro_per_epoch, steps_per_epoch, total, budget,
                    round(o_cfg.warmup_epochs * steps_per_epoch))
