"""Optimizer and learning-rate schedule of the paper's recipe (pre-training: Table 8)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .config import OptimConfig, TrainConfig


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
    """Per-step schedule; each group keeps its own ``lr_scale`` because LambdaLR multiplies its initial lr.
    ``fastmae_schedule`` records (total steps, warm-up steps) for checkpoints."""
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, min_ratio)
    )
    sched.fastmae_schedule = (total_steps, warmup_steps)
    return sched


@dataclass(frozen=True)
class StepPlan:
    """How a run's epochs map to optimizer steps (shared by pre-training, fine-tuning and probing)."""

    grad_accum: int  # micro batches per optimizer step on each rank
    micro_per_epoch: int  # micro batches per epoch on each rank (the loader's length)
    steps_per_epoch: float
    total_steps: int  # the schedule's length: train.epochs at full length
    budget: int  # steps this run takes (train.steps bounds it without changing the schedule)
    warmup_steps: int
    effective_batch: int  # micro batch x accumulation x ranks: what one optimizer step sees
    requested_batch: int  # train.batch_size

    @property
    def adjusted(self) -> bool:
        """Whether the effective batch differs from train.batch_size (not reachable with these ranks)."""
        return self.effective_batch != self.requested_batch

    def describe_adjustment(self, micro_batch: int, world_size: int) -> str:
        """One start-up line saying what was chosen instead of train.batch_size, and why."""
        per_step = micro_batch * world_size
        return (f"train.batch_size={self.requested_batch} is not reachable with micro batch {micro_batch} x "
                f"{world_size} rank(s) (steps of {per_step}): using the nearest reachable effective batch "
                f"{self.effective_batch} (accumulation {self.grad_accum}); the lr follows the linear scaling rule. "
                f"For exactly {self.requested_batch}, choose data.batch_size so that data.batch_size x ranks "
                f"divides it")


def reachable_batch(requested: int, micro_batch: int, world_size: int) -> tuple[int, int]:
    """(effective batch, accumulation): the multiple of micro batch x ranks nearest to ``requested`` (at
    least one micro batch per rank; ties go to the larger batch)."""
    per_step = micro_batch * world_size
    accum = max(1, math.floor(requested / per_step + 0.5))
    return accum * per_step, accum


def plan_steps(t_cfg: TrainConfig, o_cfg: OptimConfig, micro_batch: int, world_size: int,
               micro_per_epoch: int) -> StepPlan:
    """Effective batch = micro batch x accumulation x ranks: train.batch_size when reachable, else the nearest
    reachable one (see :func:`reachable_batch`; the caller logs :meth:`StepPlan.describe_adjustment`)."""
    effective, grad_accum = reachable_batch(t_cfg.batch_size, micro_batch, world_size)
    steps_per_epoch = micro_per_epoch / grad_accum
    total = max(1, math.floor(t_cfg.epochs * steps_per_epoch))
    budget = min(total, t_cfg.steps) if t_cfg.steps else total
    return StepPlan(grad_accum, micro_per_epoch, steps_per_epoch, total, budget,
                    round(o_cfg.warmup_epochs * steps_per_epoch), effective, t_cfg.batch_size)


def peak_lr(o_cfg: OptimConfig, plan: StepPlan) -> float:
    """The peak lr of a run: ``base_lr x effective batch / 256``, or ``optim.lr`` rescaled by the same linear
    rule when the effective batch had to differ from train.batch_size."""
    if o_cfg.lr is None:
        return o_cfg.base_lr * plan.effective_batch / 256
    return o_cfg.lr * plan.effective_batch / plan.requested_batch
