"""What a training program supplies to :class:`~fastmae.trainer.Trainer`: a :class:`Task` (loaders, model,
optimizer, the loss of a micro batch, hooks)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from .config import Config
from .distributed import DistInfo
from .memory import MemoryEstimate
from .optim import StepPlan


class Trainer(Protocol):
    """What a task may read of the trainer that runs it (:class:`fastmae.trainer.Trainer` is one)."""

    cfg: Config
    dist: DistInfo
    plan: StepPlan
    engine: Any  # the DeepSpeed engine; ``engine.module`` is the model
    optimizer: Any
    loader: Any
    val_loader: Any
    step: int
    zero_stage: int
    reduce_bucket_size: int

    @property
    def logger(self) -> Any: ...  # fastmae.metrics.MetricsLogger, or None

    def autocast(self) -> Any: ...

    def log0(self, *msg: Any) -> None: ...


class Task:
    """What a program supplies to :class:`Trainer`; the defaults suit a model whose forward gives the loss."""

    name = "training"
    # config sections/keys this program does not use -> why (an override of one is refused at start)
    ignored: dict[str, str] = {}

    def build_loaders(self, tr: Trainer) -> tuple[Any, Any | None]:
        """This rank's training loader and validation loader (None: no validation)."""
        raise NotImplementedError

    def build_model(self, tr: Trainer) -> nn.Module:
        raise NotImplementedError

    def memory_estimate(self, tr: Trainer, zero_stage: int, activation_checkpointing: bool) -> MemoryEstimate | None:
        """Analytic per-rank memory (decides ``train.activation_checkpointing=auto``); None = unknown."""
        return None

    def build_optimizer(self, tr: Trainer, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def loss(self, tr: Trainer, imgs: torch.Tensor, labels: torch.Tensor, micro_id: int) -> torch.Tensor:
        """The scalar loss of one micro batch through ``tr.engine`` (``micro_id``: the global micro batch)."""
        raise NotImplementedError

    def flops_per_image(self, tr: Trainer) -> float:
        """Training FLOPs per image (forward + backward) for TFLOP/s and MFU."""
        return 0.0

    def describe(self, tr: Trainer) -> list[str]:
        """Extra start-up lines."""
        return []

    def on_epoch_end(self, tr: Trainer, epoch_done: int, final: bool) -> bool:
        """After a whole epoch (``final``: after the run's last step). True = save a checkpoint now."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Program state that goes into every checkpoint (e.g. best accuracy)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}
