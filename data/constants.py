"""Constants the data modules share (no imports of other fastmae.data modules: the bottom of the graph)."""

from __future__ import annotations

from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("train", "eval")
INTERPOLATIONS = ("bicubic", "bilinear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what a sample that cannot be read or decoded does: stop the run, or skip it (data.on_error)
ON_ERROR = ("stop", "skip")
# how a loader orders and reads the shards (data.read): global shuffle with random reads, or streamed
READS = ("global", "stream")
# data.backend: auto picks DALI when it imports, else the torch loader
BACKENDS = ("auto", "dali", "torch", "synthetic")
# data.crop: the training crop (random_resized | fixed | center; paper Table 1e)
CROPS = ("random_resized", "fixed", "center")
# data.read: auto streams remote shards and reads local ones globally
READ_CHOICES = ("auto", *READS)


def check_section(d: Any) -> None:
    """Every value of a data config section (:class:`fastmae.config.DataConfig`), each refused as ``data.key=...``
    with what is valid (ValueError). The config's validation and :func:`fastmae.data.build_loader` both call it."""

    def choice(key: str, valid: tuple[str, ...]) -> None:
        value = getattr(d, key)
        if value not in valid:
            raise ValueError(f"data.{key}={value!r} is not valid; valid choices: {', '.join(valid)}")

    def positive(key: str, allow_zero: bool = False) -> None:
        value = getattr(d, key)
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"data.{key}={value} must be {'>= 0' if allow_zero else '> 0'}")

    choice("backend", BACKENDS)
    choice("dtype", tuple(DTYPES))
    choice("interpolation", INTERPOLATIONS)
    choice("on_error", ON_ERROR)
    choice("read", READ_CHOICES)
    choice("crop", CROPS)
    if not 0.0 <= d.color_jitter < 1.0:
        raise ValueError(f"data.color_jitter={d.color_jitter} must lie in [0, 1) (0 = off; the paper's variant: 0.4)")
    if d.backend == "synthetic":
        _refuse_synthetic_augmentation(d)
    for key in ("shuffle_buffer", "stream_fetchers", "batch_size", "synthetic_size"):
        positive(key)
    for key in ("preallocate_width_hint", "preallocate_height_hint", "max_bad_samples", "num_workers"):
        positive(key, allow_zero=True)
    if not 0.0 <= d.hw_decoder_load <= 1.0:
        raise ValueError(f"data.hw_decoder_load={d.hw_decoder_load} must lie in [0, 1]")
    if d.feed_workers < -1:
        raise ValueError(f"data.feed_workers={d.feed_workers} must be >= 0, or -1 (auto)")
    if not 0.0 < d.crop_scale_min <= d.crop_scale_max <= 1.0:
        raise ValueError(f"data.crop_scale_min={d.crop_scale_min}, data.crop_scale_max={d.crop_scale_max}: "
                         "need 0 < min <= max <= 1")


def _refuse_synthetic_augmentation(d: Any) -> None:
    """The synthetic backend makes random tensors: it crops, flips and jitters nothing, so a run asking for a
    training augmentation other than the paper's (data.crop, data.hflip, data.color_jitter) is refused rather
    than run without it."""
    asked = [f"data.{k}={v}" for k, v, paper in (("crop", d.crop, d.crop == "random_resized"),
                                                  ("hflip", d.hflip, bool(d.hflip)),
                                                  ("color_jitter", d.color_jitter, d.color_jitter == 0))
             if not paper]
    if asked:
        raise ValueError(f"{', '.join(asked)} cannot apply to data.backend=synthetic: the synthetic loader makes "
                         "random tensors (no crop, flip or colour jitter); use data.backend=dali or torch for these "
                         "settings")
