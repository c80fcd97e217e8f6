"""RandAugment for fine-tuning: a timm policy string (``"rand-m9-mstd0.5-inc1"``) run per sample after
RandomResizedCrop, by DALI's ``auto_aug`` operations on the DALI backend and timm's ``rand_augment_transform``
on the torch backend, every draw coming from the sample's (seed, epoch, step, rank) so batches resume exactly.
See data/README.md.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from .constants import IMAGENET_MEAN

MAX_LEVEL = 10.0  # timm's magnitude scale: level 10 = the full range of an op
NUM_BINS = 41  # DALI magnitude bins: level 0, 0.25, ..., 10 (each bin costs pipeline build time)
TRANSLATE_PCT = 0.45  # timm's default largest translation, a fraction of the image side
UNIFORMS_PER_OP = 4  # op choice, apply-or-not, magnitude noise, sign
_NORMAL = statistics.NormalDist()


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A parsed timm RandAugment string."""

    text: str
    n: int = 2
    m: float = 10.0
    mstd: float = 0.0
    increasing: bool = False
    prob: float = 0.5

    def level(self, u: float) -> float:
        """One op's magnitude level in [0, 10] from a uniform ``u`` (timm: Gaussian around ``m`` with std
        ``mstd``, uniform in [0, m] for ``mstd=inf``, clipped)."""
        if self.mstd == math.inf:
            lvl = u * self.m
        elif self.mstd > 0:
            lvl = self.m + self.mstd * _NORMAL.inv_cdf(min(max(u, 1e-12), 1 - 1e-12))
        else:
            lvl = self.m
        return min(max(lvl, 0.0), MAX_LEVEL)


def parse_policy(text: str) -> RandAugmentPolicy:
    """Parse ``"rand-m9-mstd0.5-inc1"``-style strings; unknown or malformed parts fail naming the valid ones."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaug={text!r}: a RandAugment policy starts with 'rand' (e.g. 'rand-m9-mstd0.5-inc1')")
    kw: dict[str, Any] = {}
    for part in parts[1:]:
        key = next((k for k in ("mstd", "inc", "m", "n", "p") if part.startswith(k)), None)
        if key is None:
            raise ValueError(f"randaug={text!r}: unknown part {part!r}; valid parts: m<0-10>, n<ops>, mstd<std>, "
                             "inc<0|1>, p<0-1>")
        try:
            val = float(part[len(key):])
        except ValueError:
            raise ValueError(f"randaug={text!r}: {part!r} needs a number after {key!r}") from None
        if key == "n":
            if val != int(val) or val < 0:
                raise ValueError(f"randaug={text!r}: n must be a whole number >= 0")
            kw["n"] = int(val)
        elif key == "m":
            if val != int(val) or not 0 <= val <= MAX_LEVEL:
                raise ValueError(f"randaug={text!r}: m must be a whole number in [0, 10]")
            kw["m"] = val
        elif key == "mstd":
            if val < 0:
                raise ValueError(f"randaug={text!r}: mstd must be >= 0 (> 100 or inf: uniform in [0, m])")
            kw["mstd"] = math.inf if val > 100 else val
        elif key == "inc":
            kw["increasing"] = bool(int(val))
        else:
            if not 0 <= val <= 1:
                raise ValueError(f"randaug={text!r}: p must lie in [0, 1]")
            kw["prob"] = val
    return RandAugmentPolicy(text=text, **kw)


def timm_available() -> bool:
    """Whether timm's RandAugment imports here (timm needs a torchvision that matches torch)."""
    try:
        from timm.data.auto_augment import rand_augment_transform  # noqa: F401
    except Exception:
        return False
    return True


def unavailable_reason(backend: str) -> str | None:
    """Why RandAugment cannot run on ``backend`` (``dali``/``torch``/``synthetic``), or None when it can."""
    if backend == "synthetic":
        return "the synthetic loader has no images to augment"
    if backend == "torch" and not timm_available():
        return "the torch loader uses timm's RandAugment, and timm (with torchvision) does not import here"
    return None


def describe(backend: str, policy: RandAugmentPolicy) -> str:
    """What runs, for the start-up log."""
    where = ("DALI auto_aug (RandAugment suite, 14 ops)" if backend == "dali"
             else "timm rand_augment_transform (15 ops)")
    return (f"{policy.text} via {where}: {policy.n} ops/sample, magnitude {policy.m:g}/10 std {policy.mstd:g}, "
            f"op prob {policy.prob:g}, {'increasing' if policy.increasing else 'non-monotonic (inc0)'} magnitudes")


# ----------------------------------------------------------------------------- DALI


def dali_suite(policy: RandAugmentPolicy) -> list[Any]:
    """DALI's RandAugment operations (monotonic magnitudes for ``inc1``, AutoAugment-style ranges otherwise),
    translations relative to the image side as timm's."""
    from nvidia.dali.auto_aug import rand_augment

    get = (rand_augment.get_rand_augment_suite if policy.increasing
           else rand_augment.get_rand_augment_non_monotonic_suite)
    return get(use_shape=True, max_translate_rel=TRANSLATE_PCT)


def dali_params(policy: RandAugmentPolicy, u: np.ndarray, num_ops: int, identity: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(op index, magnitude bin, negate flag), each (B, n) int32, from (B, 4n) uniforms: an op chosen
    uniformly from the suite, replaced by ``identity`` with probability ``1 - prob``, its magnitude level
    (with ``mstd`` noise) as one of :data:`NUM_BINS` bins, its sign negated with probability 1/2."""
    b, n = u.shape[0], policy.n
    v = u.reshape(b, n, UNIFORMS_PER_OP)
    ops = np.minimum((v[..., 0] * num_ops).astype(np.int32), num_ops - 1)
    ops[v[..., 1] >= policy.prob] = identity
    levels = np.vectorize(policy.level, otypes=[np.float64])(v[..., 2]) if b * n else np.zeros((b, n))
    bins = np.rint(levels / MAX_LEVEL * (NUM_BINS - 1)).astype(np.int32)
    signs = (v[..., 3] < 0.5).astype(np.int32)
    return ops, bins, signs


def dali_apply(images: Any, policy: RandAugmentPolicy, suite: list[Any], ops: Any, bins: Any, signs: Any,
               img_size: int) -> Any:
    """Inside a ``@pipeline_def(enable_conditionals=True)``: ``policy.n`` RandAugment layers on HWC uint8
    ``images`` (img_size x img_size), each sample routed to its op by ``core.select``."""
    from nvidia.dali.auto_aug.core import select, signed_bin

    for layer in range(policy.n):
        images = select(suite, ops[layer], data=images,
                        magnitude_bin=signed_bin(bins[layer], random_sign=signs[layer]),
                        num_magnitude_bins=NUM_BINS, shape=(img_size, img_size), fill_value=128)
    return images


# ----------------------------------------------------------------------------- torch (timm, PIL)


class TimmRandAugment:
    """timm's RandAugment on one PIL image, with the global RNGs it draws from seeded per sample."""

    def __init__(self, policy: RandAugmentPolicy, img_size: int) -> None:
        try:
            from timm.data.auto_augment import rand_augment_transform
        except Exception as e:
            raise ImportError(f"randaug={policy.text!r} on the torch loader needs timm ({type(e).__name__}: {e}); "
                              "install timm with a matching torchvision, use data.backend=dali, or set "
                              "cls.randaug=''") from e
        hp = dict(translate_const=int(img_size * TRANSLATE_PCT),
                  img_mean=tuple(round(255 * m) for m in IMAGENET_MEAN))
        self.transform = rand_augment_transform(policy.text, hp)

    def __call__(self, img: Any, u: np.ndarray) -> Any:
        seed = int.from_bytes(np.asarray(u, dtype=np.float64).tobytes(), "little") % (2**32)
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
