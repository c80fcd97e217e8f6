"""``train.on_nonfinite``: what every rank does, together, when some rank's loss is NaN or inf.

``stop`` records each micro batch's finiteness on the device and, at log and checkpoint steps only, agrees on
the first bad step (and rank) and stops there on every rank; ``skip`` agrees after every micro batch (one host
sync) and replaces a bad one by a zero-gradient blank batch on every rank, so accumulation and the gradient
reductions stay in step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import NonFiniteLossError
from .failfast import StepAgreement


class NonFinitePolicy:
    def __init__(self, mode: str, rank: int, world_size: int, agree: StepAgreement,
                 log: Callable[[str], None]) -> None:
        self.mode, self.rank, self.world_size, self.agree, self.log = mode, rank, world_size, agree, log

    @property
    def skips(self) -> bool:
        return self.mode == "skip"

    def skip_if_nonfinite(self, loss: torch.Tensor, step: int,
                          blank_loss: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(the loss to back-propagate, 1 if this micro batch was replaced else 0). ``blank_loss``: the loss of
        the same micro batch with blank images (its randomness re-seeded), taken times 0."""
        bad = 0.0 if bool(torch.isfinite(loss.detach())) else float(self.rank + 1)
        worst = int(self.agree.now([bad])[0])
        if not worst:
            return loss, 0
        self.log(f"skipping a micro batch with non-finite loss at step {step} (rank {worst - 1})")
        blank = blank_loss() * 0.0
        if not bool(torch.isfinite(blank.detach())):
            raise FloatingPointError(f"step {step}: even a blank batch gives a non-finite loss (the weights are "
                                     "no longer finite); cannot skip")
        return blank, 1

    def check(self, flags: torch.Tensor, n: int, accum: int, step: int, last_good: str) -> None:
        """``stop``: raise :class:`NonFiniteLossError` on every rank when any micro batch of the window (``flags``
        of its ``n`` micro batches, ``accum`` per step, the last one of ``step``) was not finite."""
        if self.mode != "stop":
            return
        first = math.inf
        if n and bool(flags[:n].any()):
            i = int(flags[:n].nonzero()[0, 0])
            first = float((step - (n - 1 - i) // accum) * self.world_size + self.rank)
        agreed = self.agree.now([first], op="min")[0]
        if math.isfinite(agreed):
            bad_step, rank = divmod(int(agreed), self.world_size)
            raise NonFiniteLossError(
                f"non-finite loss at step {bad_step} (rank {rank}); last good checkpoint: {last_good}. "
                "Lower optim.base_lr, set optim.clip_grad, or train.on_nonfinite=skip to drop such batches")
