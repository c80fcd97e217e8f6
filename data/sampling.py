"""Which samples each rank reads in each step, and the augmentation of each one: pure functions of (seed,
epoch, step, rank) shared by the DALI and torch loaders, so both read the same samples with the same crops and
flips, and a resumed run reproduces the batches of an uninterrupted one. See data/README.md.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from .constants import CROPS

# label of a padding sample (torch's cross-entropy ``ignore_index`` default); never a real class
PAD_LABEL = -100
# data.on_error=skip: how many following samples are tried in place of a bad one
SKIP_TRIES = 16
RRC_ATTEMPTS = 10
# (area, log-ratio, y, x) per attempt + flip; data.crop=fixed reads its (x, y) position from the first two
UNIFORMS_PER_SAMPLE = 4 * RRC_ATTEMPTS + 1
RATIO = (3.0 / 4.0, 4.0 / 3.0)
# data.color_jitter: the factors drawn per sample, applied in this order (see fastmae.data.base.color_jitter)
JITTER_OPS = ("brightness", "contrast", "saturation")


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches per rank per epoch (the same on every rank); with ``drop_last`` only full global batches
    (0 when the dataset is smaller than one)."""
    if drop_last:
        return num_samples // (world_size * batch_size)
    return max(1, math.ceil(num_samples / (world_size * batch_size)))


def steps_from(num_samples: int, start_sample: int, world_size: int, batch_size: int,
               drop_last: bool = False) -> int:
    """Batches per rank that cover the epoch order from ``start_sample`` on (0 when nothing is left); with
    ``drop_last`` only the full global batches."""
    left = max(0, num_samples - start_sample)
    if drop_last:
        return left // (world_size * batch_size)
    return math.ceil(left / (world_size * batch_size))


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order in which an epoch visits samples (a permutation; identity without shuffle)."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples).astype(np.int64)


def buffer_shuffle(items: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """``items`` through a shuffle buffer of ``buffer`` slots (webdataset's ``shuffle``): the buffer fills
    with the first ``buffer`` items; each output is a random slot, refilled with the next item; at the end
    the rest leaves in random order. Output ``i`` is always one of ``items[:i + buffer]``, so a reader holds
    at most ``buffer`` items (plus the shards they come from) at a time."""
    n = len(items)
    if buffer <= 1 or n <= 1:
        return items.copy()
    out = np.empty_like(items)
    buf = items[: min(buffer, n)].tolist()
    u = rng.random(n)
    for k in range(n):
        j = int(u[k] * len(buf))
        out[k] = buf[j]
        nxt = k + buffer
        if nxt < n:
            buf[j] = int(items[nxt])
        else:  # draining: drop the slot, keep the others
            buf[j] = buf[-1]
            buf.pop()
    return out


def stream_order(shard_sizes: tuple[int, ...], epoch: int, seed: int, shuffle: bool, world_size: int,
                 batch_size: int, drop_last: bool, buffer: int) -> np.ndarray:
    """The epoch order of streamed shards (``data.read=stream``), laid out for ``world_size`` x ``batch_size``.

    The shards are shuffled per (seed, epoch) and their samples concatenated in that order; each rank takes
    one contiguous run of that sequence, as long as the samples :func:`rank_batch` gives it this epoch, so a
    rank reads ``n / world_size`` samples from about as many consecutive shards, each shard one sequential
    read (two ranks share at most one shard at each boundary). A rank's run goes through a seeded shuffle
    buffer (:func:`buffer_shuffle`, ``buffer`` samples) and is placed at the positions :func:`rank_batch`
    reads for that rank, so the same batching code serves both orders; what drop_last leaves out this epoch
    is the tail of the shard sequence (different shards each epoch). Without shuffle (evaluation): shards
    in order, no buffer. Every sample is in the order exactly once.
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    n = int(sizes.sum())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rng = np.random.default_rng([seed, epoch, 0x57EA])
    shards = rng.permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    seq = np.concatenate([np.arange(starts[s], starts[s] + sizes[s], dtype=np.int64) for s in shards])
    positions = np.arange(n, dtype=np.int64)
    steps = steps_per_epoch(n, world_size, batch_size, drop_last)
    slots: list[list[np.ndarray]] = [[] for _ in range(world_size)]
    for step in range(steps):
        for r in range(world_size):
            pos, pad = rank_batch(positions, step, r, world_size, batch_size)
            if not pad:
                slots[r].append(pos)
    order = np.empty(n, dtype=np.int64)
    filled = np.zeros(n, dtype=bool)
    at = 0
    for r in range(world_size):
        pos = np.concatenate(slots[r]) if slots[r] else np.empty(0, dtype=np.int64)
        run = seq[at:at + len(pos)]
        at += len(pos)
        if shuffle:
            run = buffer_shuffle(run, buffer, np.random.default_rng([seed, epoch, r, world_size, 0xB0F]))
        order[pos] = run
        filled[pos] = True
    order[~filled] = seq[at:]  # the tail drop_last leaves out this epoch
    return order


def rank_batch(
    order: np.ndarray, step: int, rank: int, world_size: int, batch_size: int
) -> tuple[np.ndarray, bool]:
    """Global sample indices of ``rank``'s batch at ``step`` and whether it is a padding batch."""
    n = len(order)
    start = step * world_size * batch_size
    remaining = n - start
    if remaining >= world_size * batch_size:
        lo = start + rank * batch_size
        return order[lo:lo + batch_size], False
    base, extra = divmod(remaining, world_size)
    lo = start + rank * base + min(rank, extra)
    size = base + (1 if rank < extra else 0)
    if size == 0:
        return order[start:start + 1], True
    return order[lo:lo + size], False


def _stream(seed: int, epoch: int, step: int, rank: int, tag: int, segment: int) -> np.random.Generator:
    # segment 0 (an epoch laid out from its first sample) keeps the key of runs that never changed layout
    key = [seed, epoch, step, rank, tag] + ([segment] if segment else [])
    return np.random.default_rng(key)


def batch_uniforms(seed: int, epoch: int, step: int, rank: int, size: int, segment: int = 0) -> np.ndarray:
    """Uniform numbers in [0, 1) that fix the crops and flips of one batch: shape (size, 41). ``segment`` is
    the sample offset where the batch layout of this epoch began (non-zero after a resume on another
    number of ranks or micro batch)."""
    return _stream(seed, epoch, step, rank, 0xA06, segment).random((size, UNIFORMS_PER_SAMPLE))


def randaug_uniforms(seed: int, epoch: int, step: int, rank: int, size: int, layers: int,
                     segment: int = 0) -> np.ndarray:
    """Uniform numbers in [0, 1) that fix the RandAugment ops of one batch: shape (size, 4 * layers), a
    stream of its own (the crops and flips do not change when RandAugment is switched on)."""
    return _stream(seed, epoch, step, rank, 0x7A4D, segment).random((size, 4 * layers))


def jitter_uniforms(seed: int, epoch: int, step: int, rank: int, size: int, segment: int = 0) -> np.ndarray:
    """Uniform numbers in [0, 1) that fix the colour jitter of one batch: shape (size, 3), one per op of
    :data:`JITTER_OPS`; a stream of its own (the crops and flips do not change when jitter is switched on)."""
    return _stream(seed, epoch, step, rank, 0xC7A1, segment).random((size, len(JITTER_OPS)))


def jitter_factors(u: np.ndarray, strength: float) -> np.ndarray:
    """(B, 3) float32 brightness, contrast and saturation factors, each uniform in [1 - s, 1 + s], from
    (B, 3) uniforms (torchvision's ``ColorJitter(s, s, s)`` ranges)."""
    return (1.0 - strength + 2.0 * strength * u).astype(np.float32)


def random_resized_crop_box(
    u: np.ndarray, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float] = RATIO
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` driven by given uniforms: (x, y, w, h) in pixels.

    Up to 10 tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; if none
    fits, the centre crop of the whole image clamped to ``ratio``.
    """
    area = width * height
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    for a in range(RRC_ATTEMPTS):
        ua, ur, uy, ux = u[4 * a:4 * a + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * ua)
        aspect = math.exp(lr0 + (lr1 - lr0) * ur)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(uy * (height - h + 1))
            x = int(ux * (width - w + 1))
            return x, y, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_resize_size(img_size: int) -> int:
    """Shorter side before the centre crop in eval mode (256 for 224, the usual ratio)."""
    return int(img_size * 256 / 224)


def center_crop_box(width: int, height: int, img_size: int) -> tuple[int, int, int, int]:
    """Eval crop as a box in the original image: resizing the shorter side to ``img_size*256/224`` and
    taking the centre ``img_size`` square is the same as cropping this box and resizing it to ``img_size``."""
    short = min(width, height)
    side = max(1, min(short, int(round(short * img_size / eval_resize_size(img_size)))))
    return (width - side) // 2, (height - side) // 2, side, side


def fixed_crop_box(ux: float, uy: float, width: int, height: int, img_size: int) -> tuple[int, int, int, int]:
    """data.crop=fixed as a box in the original image: an ``img_size`` square at a random position of the image
    resized to ``img_size*256/224`` on its shorter side is this box (the eval crop's side) at a position uniform
    over the whole image, resized to ``img_size``."""
    _, _, side, _ = center_crop_box(width, height, img_size)
    return int(ux * (width - side + 1)), int(uy * (height - side + 1)), side, side


@dataclass(frozen=True)
class CropSpec:
    """How a training sample is cropped and flipped (the data section's crop, crop_scale_min/max and hflip) at
    ``img_size``; evaluation always takes the centre crop, unflipped."""

    img_size: int
    crop: str
    scale: tuple[float, float]
    hflip: bool

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"data.crop={self.crop!r} is not valid; valid choices: {', '.join(CROPS)}")


def sample_crop(u: np.ndarray | None, width: int, height: int, spec: CropSpec) -> tuple[int, int, int, int, bool]:
    """(x, y, w, h, flip) of one sample in the original image from its uniforms ``u`` (a row of
    :func:`batch_uniforms`): the crop ``spec.crop`` (random_resized: RandomResizedCrop over ``spec.scale``;
    fixed: :func:`fixed_crop_box`; center: the eval crop) and, with ``spec.hflip``, a flip with p = 0.5. The
    eval centre crop, unflipped, when ``u`` is None."""
    if u is None:
        return (*center_crop_box(width, height, spec.img_size), False)
    if spec.crop == "random_resized":
        box = random_resized_crop_box(u, width, height, spec.scale)
    elif spec.crop == "fixed":
        box = fixed_crop_box(u[0], u[1], width, height, spec.img_size)
    else:
        box = center_crop_box(width, height, spec.img_size)
    return (*box, spec.hflip and bool(u[-1] < 0.5))


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, from the JPEG frame header (PIL for anything else)."""
    n = len(data)
    if n > 4 and data[0] == 0xFF and data[1] == 0xD8:
        i = 2
        while i + 9 < n:
            if data[i] != 0xFF:
                break
            while i < n and data[i] == 0xFF:
                i += 1
            marker = data[i]
            i += 1
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:
                continue
            seg = (data[i] << 8) | data[i + 1]
            if marker in _SOF:
                return (data[i + 5] << 8) | data[i + 6], (data[i + 3] << 8) | data[i + 4]
            i += seg
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size
