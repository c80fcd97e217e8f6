"""Classifier augmentations on the device batch (the same for DALI and torch loaders): label smoothing,
Mixup / CutMix and random erasing (timm's when it imports, ``cls.augment_impl``, else fastmae's versions of the
same behaviour), the soft-target loss, and the RandAugment plan handed to the training loader."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastmae.config import ClassifierConfig, Config
from fastmae.data import resolve_backend
from fastmae.data.randaug import TimmRandAugment, parse_policy, unavailable_reason
from fastmae.evaluation import PAD_LABEL


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int -> (B, C) targets: ``1 - s + s/C`` on the label, ``s/C`` elsewhere (timm ``mixup_target``)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples of ``-sum(target * log_softmax(logits))`` (timm ``SoftTargetCrossEntropy``),
    optionally weighted per sample (0 for padding samples)."""
    per = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)  # (B,)
    if weight is None:
        return per.mean()
    w = weight.to(per.dtype)
    return (per * w).sum() / w.sum().clamp(min=1.0)


class BatchMixup:
    """Mixup / CutMix per batch with label smoothing, the behaviour of timm's ``Mixup(mode="batch")``:
    with probability ``prob`` one of mixup (alpha) or cutmix (alpha, chosen with ``switch_prob`` when both
    are on) mixes sample i with sample B-1-i using ``lam ~ Beta(alpha, alpha)``; cutmix pastes one box and
    corrects ``lam`` to the pasted area."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
                 smoothing: float, num_classes: int, seed: int = 0) -> None:
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.smoothing, self.num_classes = smoothing, num_classes
        self.rng = np.random.default_rng(seed)

    def _params(self) -> tuple[float, bool]:
        if self.rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = bool(self.rng.random() < self.switch_prob)
        else:
            cut = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if cut else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), cut

    def __call__(self, imgs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam, cut = self._params()
        if lam < 1.0:
            flipped = imgs.flip(0)
            if cut:
                H, W = imgs.shape[-2:]
                r = math.sqrt(1.0 - lam)
                ch, cw = int(H * r), int(W * r)
                cy, cx = int(self.rng.integers(0, H)), int(self.rng.integers(0, W))
                y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
                x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
                imgs = imgs.clone()
                imgs[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
            else:
                imgs = imgs * lam + flipped * (1.0 - lam)
        y = smooth_one_hot(labels, self.num_classes, self.smoothing)
        return imgs, y * lam + y.flip(0) * (1.0 - lam)


class BatchRandomErasing:
    """Random erasing per sample (timm ``RandomErasing(mode="pixel", max_count=1)``): with probability
    ``p`` one box of 2-33% of the area, aspect in [0.3, 3.3] (log-uniform), filled with N(0, 1) noise."""

    def __init__(self, p: float, seed: int = 0) -> None:
        self.p = p
        self.rng = np.random.default_rng(seed)
        self.log_ratio = (math.log(0.3), math.log(1 / 0.3))

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        B, C, H, W = imgs.shape
        for i in range(B):
            if self.rng.random() >= self.p:
                continue
            for _ in range(10):
                area = H * W * self.rng.uniform(0.02, 1 / 3)
                aspect = math.exp(self.rng.uniform(*self.log_ratio))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if 0 < h < H and 0 < w < W:
                    top, left = int(self.rng.integers(0, H - h + 1)), int(self.rng.integers(0, W - w + 1))
                    imgs[i, :, top:top + h, left:left + w] = torch.randn(
                        (C, h, w), device=imgs.device, dtype=imgs.dtype)
                    break
        return imgs


def _timm_available() -> bool:
    try:
        import timm.data  # noqa: F401
    except Exception:
        return False
    return True


class BatchAugment:
    """imgs, labels -> (augmented imgs, soft targets (B, C), sample weights (B,)): random erasing, then
    mixup/cutmix, label smoothing; padding samples (label ``PAD_LABEL``) get weight 0."""

    def __init__(self, cls: ClassifierConfig, device: torch.device, seed: int = 0) -> None:
        impl = cls.augment_impl
        if impl == "auto":
            impl = "timm" if _timm_available() else "fastmae"
        if impl == "timm" and not _timm_available():
            raise ImportError("cls.augment_impl=timm but timm does not import here (pip install timm, which needs "
                              "a torchvision matching torch); use cls.augment_impl=fastmae or auto")
        self.impl = impl
        self.num_classes, self.smoothing = cls.num_classes, cls.smoothing
        self.mix: Callable[..., Any] | None = None
        self.erase: Callable[[torch.Tensor], torch.Tensor] | None = None
        mixing = cls.mixup > 0 or cls.cutmix > 0
        if impl == "timm":
            from timm.data import Mixup
            from timm.data.random_erasing import RandomErasing

            if mixing:
                self.mix = Mixup(mixup_alpha=cls.mixup, cutmix_alpha=cls.cutmix, prob=cls.mixup_prob,
                                 switch_prob=cls.mixup_switch_prob, mode="batch", label_smoothing=cls.smoothing,
                                 num_classes=cls.num_classes)
            if cls.reprob > 0:
                self.erase = RandomErasing(probability=cls.reprob, mode="pixel", max_count=1, device=str(device))
        else:
            if mixing:
                self.mix = BatchMixup(cls.mixup, cls.cutmix, cls.mixup_prob, cls.mixup_switch_prob,
                                      cls.smoothing, cls.num_classes, seed)
            if cls.reprob > 0:
                self.erase = BatchRandomErasing(cls.reprob, seed + 1)

    def describe(self) -> str:
        parts = []
        if self.erase is not None:
            parts.append("random erasing")
        if self.mix is not None:
            parts.append("mixup/cutmix")
        if self.smoothing:
            parts.append(f"label smoothing {self.smoothing}")
        return f"{', '.join(parts) or 'none'} ({self.impl})" if parts else "none"

    def reseed(self, seed: int) -> None:
        """Draw this batch's mixup/erasing choices from ``seed`` (fastmae's implementations; timm's draw from
        the global generators, which the trainer seeds per micro batch)."""
        if isinstance(self.mix, BatchMixup):
            self.mix.rng = np.random.default_rng([seed, 1])
        if isinstance(self.erase, BatchRandomErasing):
            self.erase.rng = np.random.default_rng([seed, 2])

    def __call__(self, imgs: torch.Tensor, labels: torch.Tensor,
                 seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if seed is not None:
            self.reseed(seed)
        weight = (labels != PAD_LABEL).float()
        labels = labels.clamp(min=0)
        if self.erase is not None:
            imgs = self.erase(imgs)
        # timm's batch mode needs an even batch: an odd (last, short) batch is only smoothed
        if self.mix is not None and (self.impl == "fastmae" or imgs.shape[0] % 2 == 0):
            imgs, targets = self.mix(imgs, labels)
        else:
            targets = smooth_one_hot(labels, self.num_classes, self.smoothing)
        return imgs, targets.float(), weight


def randaugment_hook(policy: str, img_size: int) -> Callable[[Any], Any]:
    """timm's RandAugment for PIL images as the torch loader builds it (hyper-parameters of timm
    ``create_transform``), drawing from the global RNGs; needs timm."""
    return TimmRandAugment(parse_policy(policy), img_size).transform


def randaug_plan(cfg: Config) -> tuple[str, str]:
    """(policy to hand the training loader, "" or why RandAugment is skipped on this backend)."""
    cls = cfg.cls
    if not cls.randaug:
        return "", ""
    reason = unavailable_reason(resolve_backend(cfg.data.backend))
    return ("", f"SKIPPED ({cls.randaug}): {reason}") if reason else (cls.randaug, "")
