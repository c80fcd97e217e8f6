"""Synthetic images on the training device: isolates model throughput from decoding."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class SyntheticLoader:
    """Endless-per-epoch batches of random normalised images and labels, generated on ``device``.

    Deterministic for a seed, rank and batch index, so a resumed run sees the same batches. One epoch is
    ``size // (batch_size * world_size)`` batches per rank.
    """

    backend = "synthetic"

    def __init__(
        self,
        batch_size: int,
        img_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        size: int = 1281167,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_classes: int = 1000,
    ) -> None:
        self.batch_size = batch_size
        self.img_size = img_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_classes = num_classes
        self.num_samples = size
        self.batches_per_epoch = max(1, size // (batch_size * world_size))
        self.epoch = 0
        self.batch_in_epoch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at ``state``'s position; with another world size or micro batch, at the batch that covers
        the same share of the epoch (synthetic images have no identity to keep exact)."""
        self.epoch = int(state["epoch"])
        batches = int(state["batch_in_epoch"])
        old = int(state.get("world_size", self.world_size)) * int(state.get("batch_size", self.batch_size))
        new = self.world_size * self.batch_size
        self.batch_in_epoch = batches if old == new else -(-batches * old // new)
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batch_in_epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.batch_in_epoch < self.batches_per_epoch:
            g = torch.Generator(device=self.device)
            idx = (self.epoch * self.batches_per_epoch + self.batch_in_epoch) * self.world_size + self.rank
            g.manual_seed(self.seed * 1_000_003 + idx)
            shape = (self.batch_size, 3, self.img_size, self.img_size)
            imgs = torch.randn(shape, generator=g, device=self.device).to(self.dtype)
            labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=g, device=self.device)
            self.batch_in_epoch += 1
            yield imgs, labels
        self.epoch += 1
        self.batch_in_epoch = 0
