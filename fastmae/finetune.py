"""End-to-end fine-tuning of a pre-trained MAE encoder for classification, with DeepSpeed:

    deepspeed fastmae/finetune.py --ds_config zero2.json --checkpoint PATH [--preset P] [k=v ...]

``PATH`` is a fastmae export / run directory or an official ``mae_pretrain_vit_*.pth``; ``--preset auto``
(the default) takes the recipe of the checkpoint's architecture. Defaults are the paper's Table 9 recipe:
AdamW (0.9, 0.999), wd 0.05, layer-wise lr decay, 5 warm-up epochs + cosine to 1e-6, drop path, label
smoothing 0.1, mixup 0.8 / cutmix 1.0 (switch 0.5), random erasing 0.25, global average pooling + fc_norm.
Validation (resize 256 -> centre crop 224, top-1/top-5) runs after every epoch; ``best.pth`` keeps the
best model, DeepSpeed checkpoints (``train.resume=auto``) the latest state.

Overrides are ``section.key=value`` for the sections of :mod:`fastmae.config` (``cls`` holds the classifier
recipe); keys fine-tuning does not use (``mask``, the decoder) are refused. The loop is the shared
:class:`~fastmae.trainer.Trainer` (resume, checkpoints, signals, non-finite policy, compile, activation
checkpointing); :mod:`fastmae.linprobe` runs the same task with a frozen encoder.

Augmentations on the batch (on the training device, so DALI and torch loaders get the same): timm's
``Mixup`` and ``RandomErasing`` when timm imports (``cls.augment_impl=auto|timm``), else fastmae's
small re-implementations of the same behaviour (``fastmae``). RandAugment (``cls.randaug``, a timm policy
string) runs per sample in the training loader, after the crop (:mod:`fastmae.data.randaug`): DALI's
``auto_aug`` operations on the DALI backend, timm's ``rand_augment_transform`` on the torch backend (skipped,
and logged as such, where timm does not import); the start-up log says which.

Where this differs from the official ``main_finetune.py``: DeepSpeed (bf16/fp32, ZeRO) instead of DDP +
fp16 AMP; erasing and mixup run on the device batch (same distributions); training batches are full (as the
official ``drop_last=True``); with ``data.drop_last=false`` and timm's mixup an odd (last, short) batch is only
label-smoothed and padding samples that even out ranks' last batches get loss weight 0; validation counts
each sample once (the official distributed eval counts duplicates); the
mixup/cutmix/erasing random streams are not restored on resume (weights, optimizer, schedule, data position,
crops, flips and RandAugment are); ``best.pth`` holds the fp32 master weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmae.config import (
    ClassifierConfig,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    get_preset,
    preset_names,
)
from fastmae.evaluation import PAD_LABEL, evaluate
from fastmae.flops import block_flops
from fastmae.memory import MemoryEstimate, estimate_memory
from fastmae.optim import build_adamw, param_groups
from fastmae.trainer import EXIT_CONFIG, Task, Trainer, describe_loader
from fastmae.vit import VisionTransformer, build_classifier, layer_decay_scale

# keys fine-tuning and probing do not use: refused when given
IGNORED = {
    "mask": "classifiers see every patch: no masking",
    "model.decoder_embed_dim": "the classifier has no decoder",
    "model.decoder_depth": "the classifier has no decoder",
    "model.decoder_num_heads": "the classifier has no decoder",
    "model.norm_pix_loss": "a pre-training loss setting",
    "model.encoder_mask_tokens": "a pre-training benchmark variant",
}
PROBE_IGNORED = {
    **IGNORED,
    "cls.drop_path": "the encoder is frozen",
    "cls.layer_decay": "only the head trains",
    "train.activation_checkpointing": "the encoder is frozen: nothing is recomputed",
}


# ----------------------------------------------------------------------------- recipes

_FT_ARCH = {  # per architecture: (base lr, layer decay, drop path, epochs)
    # base: the official FINETUNE.md values for the released (norm-pix) checkpoints; the paper's Table 9
    # baseline is blr 1e-3 / decay 0.75 -- set optim.base_lr=1e-3 cls.layer_decay=0.75 for that
    "mae_vit_base_patch16": (5e-4, 0.65, 0.1, 100),
    "mae_vit_large_patch16": (1e-3, 0.75, 0.1, 50),
    "mae_vit_huge_patch14": (1e-3, 0.75, 0.2, 50),
}


def finetune_recipe(preset: str) -> Config:
    """Preset architecture + the paper's fine-tuning recipe (Table 9), ``cls`` section included."""
    cfg = get_preset(preset)
    cls = cfg.cls
    o, t, d = cfg.optim, cfg.train, cfg.data
    o.beta1, o.beta2, o.weight_decay, o.min_lr, o.warmup_epochs, o.lr = 0.9, 0.999, 0.05, 1e-6, 5.0, None
    o.base_lr = 1e-3
    t.batch_size, t.checkpoint_interval, t.steps = 1024, 0, 0
    t.output_dir = "runs/finetune"
    d.crop_scale_min = 0.08  # timm / torchvision RandomResizedCrop default, as the official fine-tuning
    if preset in _FT_ARCH:
        o.base_lr, cls.layer_decay, cls.drop_path, t.epochs = _FT_ARCH[preset]
    if preset == "debug":
        cls.num_classes = 10  # the bundled sample
        d.batch_size, t.batch_size, t.epochs = 16, 16, 3
        o.lr, o.warmup_epochs = 1e-3, 1.0
        t.log_interval, t.output_dir = 5, "runs/debug_finetune"
    return cfg


# ----------------------------------------------------------------------------- arguments


def auto_preset(sd: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> str:
    """The preset whose recipe fits a checkpoint: its fastmae preset, else the official size, else debug."""
    cfg_d = meta.get("config")
    if isinstance(cfg_d, dict) and cfg_d.get("preset") in preset_names():
        return str(cfg_d["preset"])
    if sd is not None:
        from fastmae.interop import TIMM_SIZES, infer_model_config

        m = infer_model_config(sd, meta)
        size = TIMM_SIZES.get((m.embed_dim, m.depth, m.num_heads))
        name = f"mae_vit_{size}_patch{m.patch_size}"
        if name in preset_names():
            return name
    return "debug"


def parse_program_args(prog: str, description: str, recipe: Callable[[str], Config], argv: list[str] | None,
                       ignored: dict[str, str] | None = None) -> tuple[argparse.Namespace, Config, Any]:
    """Common command line of fine-tuning and probing; returns (args, cfg, (state dict, meta) or None)."""
    ap = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=description)
    ap.add_argument("--ds_config", default="zero2.json",
                    help="DeepSpeed JSON: a bundled name (zero1.json, zero2.json, zero3.json) or a path")
    ap.add_argument("--checkpoint", default="",
                    help="pre-trained weights: fastmae export (.pth), fastmae run/checkpoint directory, official "
                         "mae_pretrain_vit_*.pth; '' = random init (smoke tests only)")
    ap.add_argument("--preset", default="auto",
                    help=f"recipe: auto (from the checkpoint) or one of: {', '.join(preset_names())}")
    ap.add_argument("--config", default=None, help="a config.json of an earlier run (overrides apply on top)")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = ap.parse_known_args(argv)
    ignored = IGNORED if ignored is None else ignored
    loaded = None
    if args.checkpoint:
        from fastmae.interop import load_checkpoint

        loaded = load_checkpoint(args.checkpoint)
    if args.config:
        cfg = config_from_dict(json.loads(Path(args.config).read_text()))
    else:
        preset = args.preset if args.preset != "auto" else auto_preset(*(loaded or (None, {})))
        cfg = recipe(preset)
    if loaded is not None:  # the checkpoint's architecture wins over the preset's
        from fastmae.interop import infer_model_config

        attention = cfg.model.attention
        cfg.model = infer_model_config(loaded[0], loaded[1], cfg.model)
        cfg.model.attention = attention
    apply_overrides(cfg, rest, ignored, prog.split("/")[-1].removesuffix(".py"))
    return args, cfg, loaded


# ----------------------------------------------------------------------------- batch augmentations


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
    from fastmae.data.randaug import TimmRandAugment, parse_policy

    return TimmRandAugment(parse_policy(policy), img_size).transform


def randaug_plan(cfg: Config) -> tuple[str, str]:
    """(policy to hand the training loader, "" or why RandAugment is skipped on this backend)."""
    cls = cfg.cls
    if not cls.randaug:
        return "", ""
    from fastmae.data import resolve_backend
    from fastmae.data.randaug import unavailable_reason

    reason = unavailable_reason(resolve_backend(cfg.data.backend))
    return ("", f"SKIPPED ({cls.randaug}): {reason}") if reason else (cls.randaug, "")


# ----------------------------------------------------------------------------- the program


def classifier_flops(model: VisionTransformer, trainable_encoder: bool) -> float:
    """Training FLOPs per image: 3x forward (patch embed: 2x, no input gradient) when the encoder trains;
    forward + head backward when it is frozen (probing)."""
    pe = model.patch_embed
    D = model.embed_dim
    N = pe.num_patches
    patch = 2 * N * D * pe.proj.in_channels * pe.patch_size**2
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / D
    enc = len(model.blocks) * block_flops(N + 1, D, mlp_ratio)
    head = 2 * D * model.num_classes
    if trainable_encoder:
        return 3 * (enc + head) + 2 * patch
    return patch + enc + 3 * head


def full_fp32_state_dict(engine: Any, stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights (the optimizer's master copy where there is one) and buffers of the engine's module.
    Collective under ZeRO: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None and stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().clone()
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    for prefix, sub in module.named_modules():
        for name, b in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set:  # what state_dict() holds (not e.g. drop path's rate)
                out[f"{prefix}.{name}" if prefix else name] = b.detach().cpu().clone()
    return out


def make_loaders(cfg: Config, rank: int, world_size: int, device: torch.device) -> tuple[Any, Any | None, str]:
    """(train loader, validation loader or None, validation shards)."""
    from fastmae.data import build_loader

    cls = cfg.cls
    train = build_loader(cfg.data, img_size=cfg.model.img_size, rank=rank, world_size=world_size,
                         seed=cfg.train.seed, device=device, mode="train", randaug=randaug_plan(cfg)[0],
                         labels=True)
    val_shards = cls.val_shards
    if not val_shards and not cfg.data.shards and cfg.data.backend != "synthetic":
        from fastmae.data.sample import bundled_sample_dir

        val_shards = str(bundled_sample_dir("val"))
    if not val_shards and cfg.data.backend != "synthetic":
        return train, None, ""
    val_data = dataclasses.replace(cfg.data, shards=val_shards)
    if cfg.data.backend == "synthetic":
        val_data = dataclasses.replace(cfg.data, synthetic_size=max(cfg.data.batch_size * world_size, 64))
        val_shards = "synthetic"
    val = build_loader(val_data, img_size=cfg.model.img_size, rank=rank, world_size=world_size,
                       seed=cfg.train.seed, device=device, mode="eval", labels=True)
    return train, val, val_shards


def build_model(cfg: Config, loaded: Any, probe: bool) -> tuple[VisionTransformer, str]:
    """The classifier with the pre-trained encoder loaded and a freshly initialised head."""
    cls = cfg.cls
    model = build_classifier(cfg.model, cls.num_classes, global_pool=cls.global_pool,
                             drop_path=0.0 if probe else cls.drop_path, head_bn=probe)
    if loaded is None:
        return model, "random init"
    from fastmae.interop import checkpoint_kind

    sd, _ = loaded
    kind = checkpoint_kind(sd)
    missing = model.load_encoder(sd)
    head_keys = {k for k in missing if k.startswith("head")}
    if head_keys:
        model.init_head(cls.head_init_std)
    return model, f"{kind} checkpoint (fresh: {', '.join(sorted(missing)) or 'nothing'})"


class ClassifierTask(Task):
    """Fine-tuning (``probe=False``) or linear probing of a pre-trained encoder, validated every
    ``cls.eval_interval`` epochs; ``best.pth`` / ``last.pth`` keep fp32 weights."""

    def __init__(self, loaded: Any = None, probe: bool = False, checkpoint_path: str = "") -> None:
        self.loaded, self.probe, self.checkpoint_path = loaded, probe, checkpoint_path
        self.name = "linear probing" if probe else "fine-tuning"
        self.ignored = PROBE_IGNORED if probe else IGNORED
        self.best, self.history = -1.0, []
        self.source = ""
        self.val_shards = ""
        self.augment: BatchAugment | None = None
        self.checked_labels = False

    def setup(self, tr: Trainer) -> None:
        d = tr.dist
        tr.loader, tr.val_loader, self.val_shards = make_loaders(tr.cfg, d.rank, d.world_size, d.device)
        self.augment = BatchAugment(tr.cfg.cls, d.device)

    def build_model(self, tr: Trainer) -> nn.Module:
        model, self.source = build_model(tr.cfg, self.loaded, self.probe)
        if self.probe:
            for name, p in model.named_parameters():
                p.requires_grad = name.startswith("head.")
        return model

    def memory_estimate(self, tr: Trainer, zero_stage: int, activation_checkpointing: bool) -> MemoryEstimate:
        """The encoder on every patch, no decoder (an approximation for the classifier)."""
        c = tr.cfg
        m = dataclasses.replace(c.model, encoder_mask_tokens=True, decoder_depth=0)
        return estimate_memory(m, 0.5, c.data.batch_size, zero_stage, tr.dist.world_size, c.train.precision,
                               activation_checkpointing, c.model.attention, tr.reduce_bucket_size,
                               tr.plan.grad_accum)

    def build_optimizer(self, tr: Trainer, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        o = tr.cfg.optim
        if self.probe:
            from fastmae.lars import LARS

            head = [p for p in model.parameters() if p.requires_grad]
            return LARS([{"params": head, "lr": lr}], lr=lr, weight_decay=o.weight_decay, momentum=o.beta1)
        depth, decay = len(model.blocks), tr.cfg.cls.layer_decay
        groups = param_groups(model, o.weight_decay, model.no_weight_decay(),
                              lr_scale=lambda n: layer_decay_scale(n, depth, decay))
        return build_adamw(groups, o, lr, tr.dist.device)

    def loss(self, tr: Trainer, imgs: torch.Tensor, labels: torch.Tensor, micro_id: int) -> torch.Tensor:
        if not self.checked_labels:  # one host sync, once: labels must fit the head
            top = int(labels.max())
            if top >= tr.cfg.cls.num_classes:
                raise ConfigError(f"label {top} does not fit cls.num_classes={tr.cfg.cls.num_classes}; set "
                                  "cls.num_classes to the dataset's number of classes")
            self.checked_labels = True
        imgs, targets, weight = self.augment(imgs, labels, seed=micro_id)
        return soft_target_cross_entropy(tr.engine(imgs), targets, weight)

    def flops_per_image(self, tr: Trainer) -> float:
        return classifier_flops(tr.engine.module, trainable_encoder=not self.probe)

    def describe(self, tr: Trainer) -> list[str]:
        c, m = tr.cfg, tr.engine.module
        n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        randaug = randaug_plan(c)[1] or getattr(tr.loader, "randaug_info", "off")
        return [
            f"data={describe_loader(tr.loader)} | weights: {self.checkpoint_path or '(none)'} -> {self.source}",
            f"model: img {c.model.img_size} patch {c.model.patch_size} dim {c.model.embed_dim} depth "
            f"{c.model.depth} | {c.cls.num_classes} classes | pool {'avg+fc_norm' if c.cls.global_pool else 'cls'}"
            f" | {n_train / 1e6:.2f} M trainable | optimizer {type(tr.optimizer).__name__}"
            + ("" if self.probe else f" | layer decay {c.cls.layer_decay} | drop path {c.cls.drop_path}"),
            f"augment: RandomResizedCrop({c.data.crop_scale_min}-{c.data.crop_scale_max}) + flip | "
            f"RandAugment: {randaug} | batch: {self.augment.describe()} | validation: {self.val_shards or 'none'}",
        ]

    def on_epoch_end(self, tr: Trainer, epoch_done: int, final: bool) -> bool:
        """Validate every ``cls.eval_interval`` epochs and at the end; keep ``best.pth`` and ``last.pth``;
        checkpoint after every epoch."""
        cls, d = tr.cfg.cls, tr.dist
        if tr.val_loader is None or not (epoch_done % cls.eval_interval == 0 or final):
            return True
        with tr.autocast():
            stats = evaluate(tr.engine.module, tr.val_loader, d.device)
        tr.engine.train()
        stats.update(epoch=epoch_done, step=tr.step)
        self.history.append(stats)
        is_best = stats["acc1"] > self.best
        self.best = max(self.best, stats["acc1"])
        tr.log0(f"epoch {epoch_done} | val top-1 {stats['acc1']:.2f}% top-5 {stats['acc5']:.2f}% loss "
                f"{stats['loss']:.4f} ({stats['count']} images) | best top-1 {self.best:.2f}%")
        if tr.logger is not None:
            tr.logger.log({"step": tr.step, "epoch": epoch_done, "val_acc1": stats["acc1"],
                           "val_acc5": stats["acc5"], "val_loss": stats["loss"]})
        sd = full_fp32_state_dict(tr.engine, tr.zero_stage) if (is_best or final) else None
        if d.is_main and sd is not None:
            out_dir = Path(tr.cfg.train.output_dir)
            blob = {"model": sd, "config": tr.cfg.to_dict(), "cls": dataclasses.asdict(cls), "step": tr.step,
                    "epoch": epoch_done, "acc1": stats["acc1"], "acc5": stats["acc5"],
                    "classifier": {"num_classes": cls.num_classes, "global_pool": cls.global_pool,
                                   "head_bn": self.probe}}
            if is_best:
                torch.save(blob, out_dir / "best.pth")
            if final:
                torch.save(blob, out_dir / "last.pth")
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best_acc1": self.best, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best_acc1", -1.0))
        self.history = list(state.get("history", []))

    def summary(self) -> dict[str, Any]:
        return {"history": self.history, "best_acc1": self.best}


def run(cfg: Config, ds_config_name: str = "zero2.json", loaded: Any = None, probe: bool = False,
        checkpoint_path: str = "") -> dict[str, Any]:
    """Fine-tune (``probe=False``) or linear-probe in this process; returns a summary (steps, losses,
    accuracies)."""
    return Trainer(cfg, ClassifierTask(loaded, probe, checkpoint_path), ds_config_name).fit()


def main(argv: list[str] | None = None, probe: bool = False, hooks: list[Any] | None = None) -> int:
    """Command-line entry of fine-tuning (and, with ``probe=True``, of linear probing); returns the exit
    status (see :mod:`fastmae.trainer`)."""
    from fastmae.interop import UnsafeCheckpointError

    if probe:
        from fastmae.linprobe import DESCRIPTION, linprobe_recipe

        prog, desc, recipe, ignored = "fastmae/linprobe.py", DESCRIPTION, linprobe_recipe, PROBE_IGNORED
    else:
        prog, desc, recipe, ignored = "fastmae/finetune.py", __doc__.split("\n\n")[0], finetune_recipe, IGNORED
    try:
        args, cfg, loaded = parse_program_args(prog, desc, recipe, argv, ignored)
    except (ConfigError, UnsafeCheckpointError, ValueError, FileNotFoundError) as e:
        print(f"fastmae: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(cfg.to_json())
        return 0
    trainer = Trainer(cfg, ClassifierTask(loaded, probe, args.checkpoint), args.ds_config)
    trainer.batch_hooks.extend(hooks or [])
    return trainer.run()


if __name__ == "__main__":
    raise SystemExit(main())
