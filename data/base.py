"""The loader interface every backend shares (:class:`ShardLoader`) and its epoch/resume bookkeeping."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from .constants import DTYPES, IMAGENET_MEAN, IMAGENET_STD, MODES, READS
from .index import ShardError, ShardIndex
from .randaug import RandAugmentPolicy, describe, parse_policy
from .sampling import (
    JITTER_OPS,
    SKIP_TRIES,
    CropSpec,
    batch_uniforms,
    epoch_order,
    eval_resize_size,
    jitter_factors,
    jitter_uniforms,
    randaug_uniforms,
    rank_batch,
    sample_crop,
    steps_from,
    steps_per_epoch,
    stream_order,
)

T = TypeVar("T")


@dataclass
class BatchPlan:
    """One rank's batch at one step: global sample indices, padding flag, augmentation uniforms (crop + flip;
    RandAugment when it is on) and the colour jitter factors (B, 3) when it is on."""

    step: int
    indices: np.ndarray
    pad: bool
    uniforms: np.ndarray | None
    randaug: np.ndarray | None = None
    jitter: np.ndarray | None = None


@dataclass(frozen=True)
class EpochLayout:
    """What decides one rank's batches: see :mod:`fastmae.data.sampling`.

    ``start_sample`` > 0 lays the epoch out from that position of its order on: a run resumed on another
    number of ranks or micro batch continues the interrupted epoch with exactly the samples not yet consumed.
    ``drop_last``: only full global batches (the rest of the order is not read this epoch).
    ``shard_sizes`` (samples per shard) set: the streamed order (:func:`~fastmae.data.sampling.stream_order`,
    shuffle buffer ``buffer``) laid out for ``order_layout`` = (ranks, micro batch, drop_last), the layout the
    epoch began with (None: this one); None: the global shuffle.
    ``color_jitter``: the data.color_jitter strength of training batches (0 = off).
    """

    num_samples: int
    world_size: int
    rank: int
    batch_size: int
    seed: int
    shuffle: bool
    randaug_layers: int = 0
    start_sample: int = 0
    drop_last: bool = False
    shard_sizes: tuple[int, ...] | None = None
    buffer: int = 0
    order_layout: tuple[int, int, bool] | None = None
    color_jitter: float = 0.0

    def order(self, epoch: int) -> np.ndarray:
        """The order in which ``epoch`` visits the samples (all ranks together)."""
        if self.shard_sizes is None:
            return _remembered(epoch_order, self.num_samples, epoch, self.seed, self.shuffle)
        world, batch, drop_last = self.order_layout or (self.world_size, self.batch_size, self.drop_last)
        return _remembered(stream_order, self.shard_sizes, epoch, self.seed, self.shuffle, world, batch, drop_last,
                           self.buffer)

    def steps(self) -> int:
        """Batches per rank of this layout (a whole epoch when ``start_sample`` is 0)."""
        if self.start_sample == 0:
            return steps_per_epoch(self.num_samples, self.world_size, self.batch_size, self.drop_last)
        return steps_from(self.num_samples, self.start_sample, self.world_size, self.batch_size, self.drop_last)

    def consumed(self, batches: int) -> int:
        """Position in the epoch order after ``batches`` batches of this layout (all ranks together); the end
        of the order (``num_samples``) once the layout's batches are all done, dropped samples included."""
        if self.drop_last and batches >= self.steps():
            return self.num_samples
        left = self.num_samples - self.start_sample
        return self.start_sample + min(left, batches * self.world_size * self.batch_size)

    def batches(self, epoch: int, start: int) -> Iterator[BatchPlan]:
        """This rank's batches of ``epoch`` from batch ``start`` on."""
        seg = self.start_sample
        for step, (idx, pad) in enumerate(self.indices(epoch, start), start):
            u = batch_uniforms(self.seed, epoch, step, self.rank, len(idx), seg) if self.shuffle else None
            ra = (randaug_uniforms(self.seed, epoch, step, self.rank, len(idx), self.randaug_layers, seg)
                  if self.shuffle and self.randaug_layers else None)
            yield BatchPlan(step, idx, pad, u, ra, self.jitter(epoch, step, len(idx)))

    def jitter(self, epoch: int, step: int, size: int) -> np.ndarray | None:
        """The colour jitter factors (size, 3) of this rank's batch at ``step`` of ``epoch`` (None when off or
        not training): a pure function of the position, like the crops."""
        if not (self.shuffle and self.color_jitter > 0):
            return None
        u = jitter_uniforms(self.seed, epoch, step, self.rank, size, self.start_sample)
        return jitter_factors(u, self.color_jitter)

    def indices(self, epoch: int, start: int) -> Iterator[tuple[np.ndarray, bool]]:
        """This rank's sample indices (and padding flag) per batch of ``epoch`` from batch ``start`` on."""
        order = self.order(epoch)[self.start_sample:]
        for step in range(start, self.steps()):
            yield rank_batch(order, step, self.rank, self.world_size, self.batch_size)

    def batch(self, epoch: int, step: int) -> BatchPlan:
        """This rank's batch at ``step`` of ``epoch``."""
        return next(self.batches(epoch, step))


_ORDER_CACHE: dict[tuple, np.ndarray] = {}


def _remembered(fn: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
    """``fn(*args)`` for an epoch order, remembered for the last few (the feed, its worker processes and the
    spool ask for the same epoch batch by batch; a permutation of ImageNet takes ~20 ms, a streamed order's
    buffer shuffle ~0.5 s)."""
    key = (fn.__name__, *args)
    if key not in _ORDER_CACHE:
        if len(_ORDER_CACHE) >= 4:
            _ORDER_CACHE.pop(next(iter(_ORDER_CACHE)))
        _ORDER_CACHE[key] = fn(*args)
    return _ORDER_CACHE[key]


class ShardLoader:
    """Base of the shard loaders: epoch layout, position, state and per-sample augmentation parameters.

    ``for imgs, labels in loader`` yields the remaining batches of the current epoch, then advances to the
    next epoch (like :class:`~fastmae.data.SyntheticLoader`). ``batch_in_epoch`` counts the batches handed
    out (since ``start_sample``, the position where this epoch's layout began); ``state_dict()`` taken after
    training on a batch resumes at the next one.
    """

    backend = "base"

    def __init__(
        self,
        index: ShardIndex,
        cfg: Any,
        *,
        img_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device | str,
        mode: str,
        randaug: str,
        read: str,
        spool: Any = None,
    ) -> None:
        """``cfg``: the data config section (:class:`fastmae.config.DataConfig`, checked by
        :func:`~fastmae.data.constants.check_section`); the rest describes this run and rank."""
        _check_arguments(mode=mode, rank=rank, world_size=world_size, img_size=img_size, randaug=randaug, read=read)
        batch_size = cfg.batch_size
        # global: one permutation of all samples per epoch (random reads); stream: shards shuffled and split
        # across ranks, each rank's run through a seeded shuffle buffer (sequential reads; see sampling)
        self.read = read
        self.shuffle_buffer = int(cfg.shuffle_buffer)
        # samples per shard: what the streamed order is made of (fixed for the loader's life)
        self._shard_sizes = (tuple(np.bincount(index.shard_of, minlength=len(index.shards)).tolist())
                             if read == "stream" else None)
        # remote shards streamed: the rank's ShardSpool (fastmae.data.stream), told what each epoch needs
        self.spool = spool
        # a sample that cannot be read or decoded: stop (naming shard and key) or skip it, i.e. put the next
        # readable sample of the dataset in its place (deterministic), until more than max_bad_samples
        # distinct samples were bad on this rank
        self.on_error = cfg.on_error
        self.max_bad_samples = int(cfg.max_bad_samples)
        self.bad_samples: list[str] = []
        # RandAugment (a timm policy string, "" = off): see fastmae.data.randaug
        self.randaug: RandAugmentPolicy | None = parse_policy(randaug) if randaug else None
        self.index = index
        self.batch_size = batch_size
        self.img_size = img_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = torch.device(device)
        self.mode = mode
        self.crop_scale = (float(cfg.crop_scale_min), float(cfg.crop_scale_max))
        # the training crop and flip (data.crop, crop_scale_*, hflip; paper Table 1e), drawn per sample by
        # fastmae.data.sampling.sample_crop; colour jitter (data.color_jitter, 0 = off) on the device batch
        self.crop_spec = CropSpec(img_size, cfg.crop, self.crop_scale, bool(cfg.hflip))
        self.color_jitter = float(cfg.color_jitter)
        self.num_workers = cfg.num_workers
        # antialiased in both backends (PIL always is; DALI with antialias=True), like torchvision on PIL
        self.interpolation = cfg.interpolation
        # low-precision output only on GPU: CPU runs (tests, CI) compute in float32
        self.dtype = DTYPES[cfg.dtype] if self.device.type == "cuda" else torch.float32
        self.num_samples = len(index)
        # training reads full global batches only (static shapes, no duplicates); evaluation reads every sample
        self.drop_last = mode == "train" and bool(cfg.drop_last)
        if self.drop_last and self.num_samples < world_size * batch_size:
            # no full batch at all (a tiny dataset, e.g. the bundled sample on many ranks): read it whole instead
            self.drop_last = False
            if rank == 0:
                print(f"data: {self.num_samples} samples are fewer than one global batch ({world_size} rank(s) x "
                      f"micro batch {batch_size}): every epoch reads them all in one short batch per rank "
                      "(data.drop_last does not apply)", file=sys.stderr, flush=True)
        self.epoch = 0
        self.batch_in_epoch = 0
        self.start_sample = 0
        # (ranks, micro batch, drop_last) the current epoch's order was laid out for (None: ours)
        self.order_layout: tuple[int, int, bool] | None = None

    # ------------------------------------------------------------------ position and state
    def __len__(self) -> int:
        return steps_per_epoch(self.num_samples, self.world_size, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at its first batch (order and augmentations depend only on seed and epoch)."""
        self.epoch = int(epoch)
        self.batch_in_epoch = 0
        self.start_sample = 0
        self.order_layout = None

    @property
    def samples_in_epoch(self) -> int:
        """Samples of the current epoch consumed by all ranks together (the resume position)."""
        return self.layout().consumed(self.batch_in_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "start_sample": self.start_sample,
            "samples_in_epoch": self.samples_in_epoch,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "bad_samples": list(self.bad_samples),
            "read": self.read,
            "shuffle_buffer": self.shuffle_buffer,
            "order_layout": list(self.order_layout or (self.world_size, self.batch_size, self.drop_last)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position: the next batches hold exactly the samples not yet handed out.

        With the same world size and micro batch the batches are bit-identical to an uninterrupted run. With
        others the rest of the interrupted epoch is laid out from the consumed position (every sample still
        exactly once; its crops and flips are drawn anew); the epochs after it are as usual.
        """
        for key in ("num_samples", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has {key}={getattr(self, key)}: "
                    "a resume needs the same dataset and seed"
                )
        theirs = (state.get("read", "global"), int(state.get("shuffle_buffer", self.shuffle_buffer)))
        differs = theirs[0] != self.read or (self.read == "stream" and theirs[1] != self.shuffle_buffer)
        if differs and 0 < int(state.get("samples_in_epoch", 1)) < self.num_samples:
            raise ValueError(
                f"the loader state was taken mid-epoch with data.read={theirs[0]} data.shuffle_buffer={theirs[1]}; "
                f"this run has data.read={self.read} data.shuffle_buffer={self.shuffle_buffer}: another order would "
                "read some samples of that epoch twice and others not at all; resume with the old settings (they "
                "can change at an epoch boundary)")
        self.epoch = int(state["epoch"])
        self.bad_samples = list(state.get("bad_samples", []))
        # the interrupted epoch goes on in the order it began with (a streamed order depends on the layout)
        w, b, d = state.get("order_layout") or (state.get("world_size", self.world_size),
                                                 state.get("batch_size", self.batch_size),
                                                 state.get("drop_last", self.drop_last))
        order = (int(w), int(b), bool(d))
        self.order_layout = None if order == (self.world_size, self.batch_size, self.drop_last) else order
        same = all(int(state.get(k, getattr(self, k))) == getattr(self, k)
                   for k in ("world_size", "batch_size", "drop_last"))
        if same:
            self.start_sample = int(state.get("start_sample", 0))
            self.batch_in_epoch = int(state["batch_in_epoch"])
            return
        consumed = state.get("samples_in_epoch")
        if consumed is None:  # a state from a version without it: whole steps of the old layout
            consumed = int(state["batch_in_epoch"]) * int(state["world_size"]) * int(state["batch_size"])
        consumed = min(int(consumed), self.num_samples)
        self.batch_in_epoch = 0
        self.start_sample = consumed
        if consumed >= self.num_samples:  # the epoch was complete: the next one starts afresh
            self.set_epoch(self.epoch + 1)

    # ------------------------------------------------------------------ bad samples
    @property
    def skip_bad(self) -> bool:
        return self.on_error == "skip"

    def note_bad(self, names: list[str]) -> None:
        """Count samples that were skipped (``shard:key``; each counted once per run); past the limit, stop."""
        for name in names:
            if name not in self.bad_samples:
                self.bad_samples.append(name)
                print(f"rank {self.rank}: skipped a sample that cannot be read or decoded: {name} (data.on_error="
                      f"skip; {len(self.bad_samples)} so far, at most {self.max_bad_samples})", file=sys.stderr,
                      flush=True)
        if len(self.bad_samples) > self.max_bad_samples:
            shown = ", ".join(self.bad_samples[:10]) + (", ..." if len(self.bad_samples) > 10 else "")
            raise ShardError(
                f"{len(self.bad_samples)} samples could not be read or decoded on rank {self.rank}, more than "
                f"data.max_bad_samples={self.max_bad_samples}: {shown}; check the shards with `python -m "
                "fastmae.data.shards verify`")

    # ------------------------------------------------------------------ the plan
    @property
    def shuffle(self) -> bool:
        return self.mode == "train"

    def layout(self) -> EpochLayout:
        """This rank's epoch layout, detached from the loader (safe to hand to a feed thread)."""
        return EpochLayout(self.num_samples, self.world_size, self.rank, self.batch_size, self.seed, self.shuffle,
                           self.randaug.n if self.randaug else 0, self.start_sample, self.drop_last, self._shard_sizes,
                           self.shuffle_buffer, self.order_layout, self.color_jitter)

    @property
    def randaug_info(self) -> str:
        """Which RandAugment this loader runs, for the start-up log ("off" when none)."""
        return describe(self.backend, self.randaug) if self.randaug else "off"

    def plan(self, epoch: int, start: int) -> Iterator[BatchPlan]:
        """This rank's batches of ``epoch`` from batch ``start`` on."""
        return self.layout().batches(epoch, start)

    def crop(self, u: np.ndarray | None, width: int, height: int) -> tuple[int, int, int, int, bool]:
        """(x, y, w, h, flip) of one sample: data.crop + data.hflip in train mode, centre crop in eval."""
        return sample_crop(u, width, height, self.crop_spec)

    def finish(self, imgs: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """The uint8 (B, 3, S, S) images of this rank's batch at ``step`` of ``epoch``, on the device -> colour
        jitter (training with data.color_jitter > 0: :func:`color_jitter` with the batch's factors) and ImageNet
        normalisation in the loader's dtype. Both shard backends end every batch here, so they jitter alike."""
        factors = self.layout().jitter(epoch, step, len(imgs))
        jitter = None if factors is None else torch.from_numpy(factors).to(imgs.device, non_blocking=True)
        return normalize_uint8(imgs, self.dtype, jitter)

    @property
    def augment_info(self) -> str:
        """The training crop, flip and colour jitter in words, for the start-up log."""
        if not self.shuffle:
            return "centre crop"
        s, side = self.crop_spec, eval_resize_size(self.img_size)
        crop = {"random_resized": f"RandomResizedCrop({s.scale[0]:g}-{s.scale[1]:g})",
                "fixed": f"fixed {self.img_size}px crop at a random position (shorter side {side}px)",
                "center": f"centre {self.img_size}px crop (shorter side {side}px)"}[s.crop]
        text = crop + (" + flip" if s.hflip else ", no flip")
        if self.color_jitter > 0:
            text += f" + colour jitter {self.color_jitter:g} ({', '.join(JITTER_OPS)})"
        return text

    # ------------------------------------------------------------------ iteration
    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    # batches a backend may read before the trainer takes them (the spool fetches that far ahead)
    prefetch_batches = 8

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.batch_in_epoch
        if self.spool is None and getattr(self.index, "folder", None) is not None:
            raise RuntimeError("this loader of streamed shards was closed (its spool stopped); build a new one")
        if self.spool is not None:
            self.spool.schedule(self.shard_uses(epoch, start), ahead=self.prefetch_batches + 2)
        for imgs, labels in self._batches(epoch, start):
            self.batch_in_epoch += 1
            if self.spool is not None:
                self.spool.advance(self.batch_in_epoch - start)
            yield imgs, labels
        self.set_epoch(epoch + 1)

    def shard_uses(self, epoch: int, start: int) -> list[tuple[int, int, int]]:
        """(shard, first batch, last batch) of every shard this rank reads in ``epoch`` from batch ``start`` on
        (batches counted from ``start``), in order of first use."""
        shards, batch = [], []
        for k, (idx, _) in enumerate(self.layout().indices(epoch, start)):
            s = np.unique(self.index.shard_of[idx])
            shards.append(s)
            batch.append(np.full(len(s), k))
        if not shards:
            return []
        sid, b = np.concatenate(shards), np.concatenate(batch)
        first = {int(x): int(y) for x, y in zip(sid[::-1], b[::-1], strict=True)}
        last = {int(x): int(y) for x, y in zip(sid, b, strict=True)}
        return sorted(((s, first[s], last[s]) for s in first), key=lambda u: u[1])

    def describe(self) -> str:
        """The backend and how it reads, for the start-up log."""
        return f"{self.backend} ({', '.join(self._how())})"

    def _how(self) -> list[str]:
        return ([f"read={self.read}"] + ([f"shuffle buffer {self.shuffle_buffer}"] if self.read == "stream" else [])
                + [self.augment_info])

    def gpu_memory_bytes(self) -> int:
        """The loader's own GPU buffers on this rank, for the memory estimate (0: none beyond the batch the
        model receives, which the estimate counts with the activations)."""
        return 0

    def close(self) -> None:
        """Stop the spool's fetchers and remove its folder (a no-op for local shards)."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None


def replacement(index: ShardIndex, i: int, load: Callable[[int], T]) -> T:
    """data.on_error=skip: ``load`` of the first sample after ``i`` (``index.successor``) that loads without a
    :class:`ShardError`; at most ``SKIP_TRIES`` are tried."""
    j = i
    for _ in range(SKIP_TRIES):
        j = index.successor(j)
        try:
            return load(j)
        except ShardError:
            continue
    raise ShardError(f"{index.name(i)} and the {SKIP_TRIES} samples after it could not be read or decoded")


_NORM_CACHE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std x 255 as (1,3,1,1) fp32 tensors on ``device``, made once per device: building
    them per batch would be a blocking host-to-device copy every micro step."""
    if device not in _NORM_CACHE:
        mean = torch.tensor(IMAGENET_MEAN).mul_(255).view(1, 3, 1, 1).to(device)
        std = torch.tensor(IMAGENET_STD).mul_(255).view(1, 3, 1, 1).to(device)
        _NORM_CACHE[device] = (mean, std)
    return _NORM_CACHE[device]


# luma weights of the grey image (ITU-R 601-2, PIL's "L" conversion; torchvision's tensor path uses 0.2989)
GREY = (0.299, 0.587, 0.114)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,1,H,W) grey image."""
    return (x[:, 0:1] * GREY[0]).add_(x[:, 1:2], alpha=GREY[1]).add_(x[:, 2:3], alpha=GREY[2])


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """data.color_jitter on a float (B,3,H,W) batch of values in [0, 255], in place; ``factors`` (B, 3) holds
    each sample's brightness ``b``, contrast ``c`` and saturation ``s`` factor. Always in this order (torchvision's
    ColorJitter shuffles it per sample; a fixed order keeps both backends and every rerun the same), each result
    clamped to [0, 255], no rounding in between:

    - brightness: ``x * b``;
    - contrast: ``(x - m) * c + m``, ``m`` the mean of the sample's grey image;
    - saturation: ``(x - g) * s + g``, ``g`` the grey image of the sample (per pixel);

    grey = 0.299 R + 0.587 G + 0.114 B."""
    f = factors.to(device=x.device, dtype=x.dtype).view(-1, 3, 1, 1)
    b, c, s = f[:, 0:1], f[:, 1:2], f[:, 2:3]
    x.mul_(b).clamp_(0, 255)
    m = _grey(x).mean((2, 3), keepdim=True)  # (B,1,1,1)
    x.sub_(m).mul_(c).add_(m).clamp_(0, 255)
    g = _grey(x)  # (B,1,H,W)
    return x.sub_(g).mul_(s).add_(g).clamp_(0, 255)


def normalize_uint8(imgs: torch.Tensor, dtype: torch.dtype, jitter: torch.Tensor | None = None) -> torch.Tensor:
    """(B,3,H,W) uint8 -> ImageNet-normalised ``dtype`` on the same device, after :func:`color_jitter` with the
    (B, 3) factors ``jitter`` when given."""
    mean, std = _mean_std(imgs.device)
    x = imgs.float()
    if jitter is not None:
        x = color_jitter(x, jitter)
    return x.sub_(mean).div_(std).to(dtype)


def _check_arguments(*, mode: str, rank: int, world_size: int, img_size: int, randaug: str, read: str) -> None:
    """A loader's run-level arguments (its config section is checked by ``check_section``), each refused with
    what is valid."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not valid; valid modes: {', '.join(MODES)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    if img_size <= 0:
        raise ValueError(f"img_size={img_size} must be > 0")
    if randaug and mode != "train":
        raise ValueError(f"randaug={randaug!r} applies to mode='train' only (evaluation is a centre crop)")
    if read not in READS:
        raise ValueError(f"data.read={read!r} is not valid here; valid choices: {', '.join(READS)}")
