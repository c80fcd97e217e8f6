"""The fallback loader: PIL decoding in torch DataLoader workers, the same samples and crops as DALI
(RandAugment, when on, is timm's on the PIL crop: see :mod:`fastmae.data.randaug`).

Workers decode, crop and resize to uint8 (4x less to move between processes and to the GPU than float);
colour jitter (when on) and normalisation happen once per batch on the training device, as for DALI.
"""

from __future__ import annotations

import io
import os
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import ShardLoader, replacement
from .index import ShardError, ShardIndex
from .randaug import TimmRandAugment
from .sampling import PAD_LABEL, sample_crop

# (global sample index, crop/flip uniforms or None, padding flag, RandAugment uniforms or None)
Item = tuple[int, Any, bool, Any]


def _open_rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    return img if img.mode == "RGB" else img.convert("RGB")


class _Samples(torch.utils.data.Dataset):
    """Map-style view of the shards: item ``(i, u, pad)`` -> (uint8 (3,S,S) image, label)."""

    def __init__(self, loader: TorchLoader) -> None:
        self.index: ShardIndex = loader.index
        self.size = loader.img_size
        self.spec = loader.crop_spec
        self.resample = (
            Image.Resampling.BICUBIC if loader.interpolation == "bicubic" else Image.Resampling.BILINEAR
        )
        ra = loader.randaug
        self.randaug = TimmRandAugment(ra, loader.img_size) if ra is not None and ra.n > 0 else None
        self.skip = loader.skip_bad

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, int, str | None]:
        """(image, label, name of the bad sample it replaces or None)."""
        i, u, pad, ra = item
        try:
            arr, label = self._load(i, u, ra)
            return arr, (PAD_LABEL if pad else label), None
        except ShardError:
            if not self.skip:
                raise
        # the next readable sample of the dataset takes its place
        arr, label = replacement(self.index, i, lambda j: self._load(j, u, ra))
        return arr, (PAD_LABEL if pad else label), self.index.name(i)

    def _load(self, i: int, u: Any, ra: Any) -> tuple[torch.Tensor, int]:
        data, label = self.index.read_sample(i)
        try:
            img = _open_rgb(data)
            img.load()
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad data
            shard = str(self.index.shard(i))
            raise ShardError(
                f"{shard}: {self.index.key(i)}: image does not decode ({type(e).__name__}: {e}); check the "
                f"shards with `python -m fastmae.data.shards verify {os.path.dirname(shard)}`"
            ) from e
        x, y, w, h, flip = sample_crop(u, *img.size, self.spec)
        img = img.resize((self.size, self.size), self.resample, box=(x, y, x + w, y + h))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaug is not None and ra is not None:  # after crop + flip, as timm's create_transform
            img = self.randaug(img, ra)
        arr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        return arr, label


def _collate(items: list[tuple[torch.Tensor, int, str | None]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    imgs = torch.stack([im for im, _, _ in items]).contiguous()
    bad = [b for _, _, b in items if b is not None]
    return imgs, torch.tensor([lab for _, lab, _ in items], dtype=torch.int64), bad


class _PlanSampler:
    """Batch sampler that replays the loader's plan from the position set before each ``iter``."""

    def __init__(self, loader: TorchLoader) -> None:
        # a weak reference: no cycle, so dropping the loader shuts its workers down at once (a cycle left to
        # the garbage collector can finalise the worker queues first and stall the shutdown ~5 s per worker)
        self.loader = weakref.proxy(loader)
        self.start: tuple[int, int] = (0, 0)

    def __iter__(self) -> Iterator[list[Item]]:
        for b in self.loader.plan(*self.start):
            u, ra = b.uniforms, b.randaug
            yield [(int(i), None if u is None else u[j], b.pad, None if ra is None else ra[j])
                   for j, i in enumerate(b.indices)]

    def __len__(self) -> int:
        return self.loader.layout().steps() - self.start[1]


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the training process: a scheduler that signals every process of a job
    must not kill the workers before the training process has saved its checkpoint (it stops them itself)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class TorchLoader(ShardLoader):
    """WebDataset shards -> PIL -> torch DataLoader workers (``num_workers``; 0 = in this process).

    Workers are forked (torch's default on Linux) when the first epoch starts and kept across epochs. Do
    not fork them while a DALI pipeline is alive in the same process (its native threads make ``fork``
    unsafe); one training process uses one backend, so this only concerns tests and benchmarks.
    """

    backend = "torch"

    def __init__(self, index: ShardIndex, cfg: Any, **kwargs: Any) -> None:
        super().__init__(index, cfg, **kwargs)
        self._sampler = _PlanSampler(self)
        workers = max(0, self.num_workers)
        self._dl = torch.utils.data.DataLoader(
            _Samples(self),
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=_ignore_stop_signals,
        )

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is dropped)."""
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl._iterator = None
        super().close()

    @property
    def prefetch_batches(self) -> int:  # type: ignore[override]
        return self.num_workers * 4 + 1 if self.num_workers > 0 else 1  # the prefetch_factor per worker

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if start >= self.layout().steps():
            return
        self._sampler.start = (epoch, start)
        for step, (imgs, labels, bad) in enumerate(self._dl, start):
            if bad:
                self.note_bad(bad)
            imgs = imgs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield self.finish(imgs, epoch, step), labels
