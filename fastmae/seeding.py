"""Every seed of a run, as pure functions of (train.seed, rank or global micro batch): a resumed run, and a run
of another shape (1 rank x accumulation 2 = 2 ranks x accumulation 1), draws the same randomness."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; ranks get different streams."""
    s = seed + 1009 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def mask_seed(seed: int, micro_batch_id: int) -> int:
    """The masking seed of one global micro batch: a pure function, so a resumed run masks identically."""
    h = (seed * 0x9E3779B1 + micro_batch_id * 0xC2B2AE3D + 0x85EBCA77) & 0xFFFFFFFFFFFF
    h ^= h >> 17
    return (h * 0x2545F491) & 0x7FFFFFFF


def seed_micro_batch(seed: int, micro_id: int) -> None:
    """Seed python, numpy and torch for one global micro batch: every random choice inside a step (drop path,
    mixup, erasing) is then a function of (seed, micro batch), so a resumed run makes the same ones."""
    s = (seed * 0x9E3779B1 + micro_id * 0x632BE5AB + 0x5851F42D) % 2**63
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
