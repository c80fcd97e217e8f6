"""End-to-end fine-tuning of a pre-trained MAE encoder for classification, with DeepSpeed:

    deepspeed fastmae/finetune.py --ds_config zero2.json --checkpoint PATH [--preset P] [k=v ...]

``PATH`` is a fastmae export / run directory or an official ``mae_pretrain_vit_*.pth``; ``--preset auto``
(the default) takes the recipe of the checkpoint's architecture. Defaults are the paper's Table 9 recipe:
AdamW (0.9, 0.999), wd 0.05, layer-wise lr decay, 5 warm-up epochs + cosine to 1e-6, drop path, label
smoothing 0.1, mixup 0.8 / cutmix 1.0 (switch 0.5), random erasing 0.25, global average pooling + fc_norm.
Validation (resize 256 -> centre crop 224, top-1/top-5) runs after every epoch; ``best.pth`` keeps the
best model, DeepSpeed checkpoints (``train.resume=auto``) the latest state.

Overrides are ``section.key=value``: the sections of :mod:`fastmae.config` plus ``cls`` (this program's
:class:`ClassifierConfig`). :mod:`fastmae.linprobe` runs the same loop with a frozen encoder.

Augmentations on the batch (on the training device, so DALI and torch loaders get the same): timm's
``Mixup`` and ``RandomErasing`` when timm imports (``cls.augment_impl=auto|timm``), else fastmae's
small re-implementations of the same behaviour (``fastmae``). RandAugment (``cls.randaug``, a timm policy
string) runs per sample in the training loader, after the crop (:mod:`fastmae.data.randaug`): DALI's
``auto_aug`` operations on the DALI backend, timm's ``rand_augment_transform`` on the torch backend (skipped,
and logged as such, where timm does not import); the start-up log says which.

Where this differs from the official ``main_finetune.py``: DeepSpeed (bf16/fp32, ZeRO) instead of DDP +
fp16 AMP; erasing and mixup run on the device batch (same distributions); with timm's mixup an odd
(last, short) batch is only label-smoothed; padding samples that even out ranks' last batches get loss
weight 0 and are not counted in validation (the official distributed eval counts duplicates); the
mixup/cutmix/erasing random streams are not restored on resume (weights, optimizer, schedule, data position,
crops, flips and RandAugment are); ``best.pth`` holds the fp32 master weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastmae import checkpoint as ckpt
from fastmae.config import (
    Config,
    ConfigError,
    _field_types,
    _parse_value,
    apply_overrides,
    config_from_dict,
    get_preset,
    preset_names,
)
from fastmae.evaluation import PAD_LABEL, evaluate
from fastmae.flops import block_flops
from fastmae.metrics import MetricsLogger, peak_tflops
from fastmae.optim import build_adamw, build_scheduler, param_groups, plan_steps, scaled_lr
from fastmae.runtime import (
    DistInfo,
    fill_ds_config,
    init_distributed,
    load_ds_config,
    seed_everything,
    shutdown_distributed,
)
from fastmae.vit import VisionTransformer, build_classifier, layer_decay_scale

AUGMENT_IMPLS = ("auto", "timm", "fastmae")


@dataclass
class ClassifierConfig:
    """The ``cls`` section: the classifier and its fine-tuning / probing recipe."""

    num_classes: int = 1000
    # True: mean of patch tokens + fc_norm (official fine-tuning default); False: cls token after norm
    global_pool: bool = True
    drop_path: float = 0.1
    # layer-wise lr decay (1.0 = off)
    layer_decay: float = 0.75
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    # random erasing probability (timm "pixel" mode, one box)
    reprob: float = 0.25
    # timm RandAugment policy, run by the training loader (DALI's or timm's ops, see module doc); "" = off
    randaug: str = "rand-m9-mstd0.5-inc1"
    # auto | timm | fastmae: which implementation of mixup/cutmix/random erasing
    augment_impl: str = "auto"
    # validation shards; "" = the bundled sample's val split when data.shards is "", else no validation
    val_shards: str = ""
    # re-initialisation std of the head weights after loading (official: 2e-5 fine-tune, 0.01 probe)
    head_init_std: float = 2e-5
    # evaluate every this many epochs (and at the end)
    eval_interval: int = 1


# ----------------------------------------------------------------------------- recipes

_FT_ARCH = {  # per architecture: (base lr, layer decay, drop path, epochs)
    # base: the official FINETUNE.md values for the released (norm-pix) checkpoints; the paper's Table 9
    # baseline is blr 1e-3 / decay 0.75 -- set optim.base_lr=1e-3 cls.layer_decay=0.75 for that
    "mae_vit_base_patch16": (5e-4, 0.65, 0.1, 100),
    "mae_vit_large_patch16": (1e-3, 0.75, 0.1, 50),
    "mae_vit_huge_patch14": (1e-3, 0.75, 0.2, 50),
}


def finetune_recipe(preset: str) -> tuple[Config, ClassifierConfig]:
    """Preset architecture + the paper's fine-tuning recipe (Table 9)."""
    cfg = get_preset(preset)
    cls = ClassifierConfig()
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
    return cfg, cls


# ----------------------------------------------------------------------------- arguments


def _set_cls(cls: ClassifierConfig, key: str, value: str) -> None:
    types_ = _field_types(cls)
    name = key.split(".", 1)[1]
    if name not in types_:
        raise ConfigError(f"unknown key {key!r}; valid keys in [cls]: {', '.join(types_)}")
    setattr(cls, name, _parse_value(value, types_[name], key))


def split_overrides(rest: list[str]) -> tuple[list[str], list[str]]:
    """(``cls.*`` overrides, the others) as ``key=value`` strings."""
    pairs: list[str] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            tok = tok[2:]
            if "=" not in tok:
                if i + 1 >= len(rest):
                    raise ConfigError(f"override --{tok} has no value")
                tok, i = f"{tok}={rest[i + 1]}", i + 1
        pairs.append(tok)
        i += 1
    return [p for p in pairs if p.startswith("cls.")], [p for p in pairs if not p.startswith("cls.")]


def validate_cls(cls: ClassifierConfig) -> None:
    if cls.num_classes < 1:
        raise ConfigError(f"cls.num_classes={cls.num_classes} must be >= 1")
    for k in ("drop_path", "smoothing", "mixup_prob", "mixup_switch_prob", "reprob"):
        v = getattr(cls, k)
        if not 0.0 <= v <= 1.0 or (k in ("drop_path", "smoothing") and v == 1.0):
            raise ConfigError(f"cls.{k}={v} must lie in [0, 1)" if k in ("drop_path", "smoothing")
                              else f"cls.{k}={v} must lie in [0, 1]")
    for k in ("mixup", "cutmix", "head_init_std"):
        if getattr(cls, k) < 0:
            raise ConfigError(f"cls.{k}={getattr(cls, k)} must be >= 0")
    if not 0.0 < cls.layer_decay <= 1.0:
        raise ConfigError(f"cls.layer_decay={cls.layer_decay} must lie in (0, 1]")
    if cls.eval_interval < 1:
        raise ConfigError(f"cls.eval_interval={cls.eval_interval} must be >= 1")
    if cls.augment_impl not in AUGMENT_IMPLS:
        raise ConfigError(f"cls.augment_impl={cls.augment_impl!r} is not valid; valid: {', '.join(AUGMENT_IMPLS)}")
    if cls.randaug:
        from fastmae.data.randaug import parse_policy

        try:
            parse_policy(cls.randaug)
        except ValueError as e:
            raise ConfigError(f"cls.{e}") from None


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


def parse_program_args(prog: str, description: str, recipe: Callable[[str], tuple[Config, ClassifierConfig]],
                       argv: list[str] | None) -> tuple[argparse.Namespace, Config, ClassifierConfig, Any]:
    """Common command line of fine-tuning and probing; returns (args, cfg, cls, (state dict, meta) or None)."""
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
    loaded = None
    if args.checkpoint:
        from fastmae.interop import load_checkpoint

        loaded = load_checkpoint(args.checkpoint)
    cls_over, other = split_overrides(rest)
    if args.config:
        saved = json.loads(Path(args.config).read_text())
        cfg = config_from_dict({k: v for k, v in saved.items() if k != "cls"})
        cls = ClassifierConfig(**saved.get("cls", {}))
    else:
        preset = args.preset if args.preset != "auto" else auto_preset(*(loaded or (None, {})))
        cfg, cls = recipe(preset)
    if loaded is not None:  # the checkpoint's architecture wins over the preset's
        from fastmae.interop import infer_model_config

        attention = cfg.model.attention
        cfg.model = infer_model_config(loaded[0], loaded[1], cfg.model)
        cfg.model.attention = attention
    for kv in cls_over:
        if "=" not in kv:
            raise ConfigError(f"cannot read override {kv!r}: write cls.key=value")
        k, v = kv.split("=", 1)
        _set_cls(cls, k.strip(), v.strip())
    apply_overrides(cfg, other)
    validate_cls(cls)
    return args, cfg, cls, loaded


def full_config(cfg: Config, cls: ClassifierConfig) -> dict[str, Any]:
    return {**cfg.to_dict(), "cls": dataclasses.asdict(cls)}


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

    def __init__(self, cls: ClassifierConfig, device: torch.device, seed: int) -> None:
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

    def __call__(self, imgs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def randaug_plan(cfg: Config, cls: ClassifierConfig) -> tuple[str, str]:
    """(policy to hand the training loader, "" or why RandAugment is skipped on this backend)."""
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


def log0(dist: DistInfo, *msg: Any) -> None:
    if dist.is_main:
        print("[fastmae]", *msg, flush=True)


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
    for name, b in module.named_buffers():
        out[name] = b.detach().cpu().clone()
    return out


def make_loaders(cfg: Config, cls: ClassifierConfig, dist: DistInfo) -> tuple[Any, Any | None, str]:
    """(train loader, validation loader or None, validation shards)."""
    from fastmae.data import build_loader

    train = build_loader(cfg.data, img_size=cfg.model.img_size, rank=dist.rank, world_size=dist.world_size,
                         seed=cfg.train.seed, device=dist.device, mode="train", randaug=randaug_plan(cfg, cls)[0])
    val_shards = cls.val_shards
    if not val_shards and not cfg.data.shards and cfg.data.backend != "synthetic":
        from fastmae.data.sample import bundled_sample_dir

        val_shards = str(bundled_sample_dir("val"))
    if not val_shards and cfg.data.backend != "synthetic":
        return train, None, ""
    val_data = dataclasses.replace(cfg.data, shards=val_shards)
    if cfg.data.backend == "synthetic":
        val_data = dataclasses.replace(cfg.data, synthetic_size=max(cfg.data.batch_size * dist.world_size, 64))
        val_shards = "synthetic"
    val = build_loader(val_data, img_size=cfg.model.img_size, rank=dist.rank, world_size=dist.world_size,
                       seed=cfg.train.seed, device=dist.device, mode="eval")
    return train, val, val_shards


def build_model(cfg: Config, cls: ClassifierConfig, loaded: Any, probe: bool) -> tuple[VisionTransformer, str]:
    """The classifier with the pre-trained encoder loaded and a freshly initialised head."""
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


def run(cfg: Config, cls: ClassifierConfig, ds_config_name: str, loaded: Any = None, probe: bool = False,
        checkpoint_path: str = "") -> dict[str, Any]:
    """Fine-tune (``probe=False``) or linear-probe; returns a summary (steps, losses, accuracies)."""
    import deepspeed

    dist = init_distributed()
    try:
        return _run(cfg, cls, ds_config_name, loaded, probe, checkpoint_path, dist, deepspeed)
    finally:
        shutdown_distributed()


def _run(cfg: Config, cls: ClassifierConfig, ds_config_name: str, loaded: Any, probe: bool,
         checkpoint_path: str, dist: DistInfo, deepspeed: Any) -> dict[str, Any]:
    t_cfg, o_cfg = cfg.train, cfg.optim
    what = "linear probing" if probe else "fine-tuning"
    seed_everything(t_cfg.seed, dist.rank)
    out_dir = Path(t_cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(full_config(cfg, cls), indent=2, sort_keys=True))

    # ---- data
    loader, val_loader, val_shards = make_loaders(cfg, cls, dist)
    micro = cfg.data.batch_size
    plan = plan_steps(t_cfg, o_cfg, micro, dist.world_size, len(loader))
    grad_accum, micro_per_epoch, budget = plan.grad_accum, plan.micro_per_epoch, plan.budget
    total_steps, warmup_steps = plan.total_steps, plan.warmup_steps

    # ---- model, optimizer, engine
    model, source = build_model(cfg, cls, loaded, probe)
    lr = scaled_lr(o_cfg, t_cfg.batch_size)
    if probe:
        from fastmae.lars import LARS

        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
        head = [p for p in model.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer = LARS([{"params": head, "lr": lr}], lr=lr,
                                                weight_decay=o_cfg.weight_decay, momentum=o_cfg.beta1)
    else:
        depth = len(model.blocks)
        groups = param_groups(model, o_cfg.weight_decay, model.no_weight_decay(),
                              lr_scale=lambda n: layer_decay_scale(n, depth, cls.layer_decay))
        optimizer = build_adamw(groups, o_cfg, lr, dist.device)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, o_cfg.min_lr / lr)
    ds_config = fill_ds_config(load_ds_config(ds_config_name), micro_batch=micro, grad_accum=grad_accum,
                               world_size=dist.world_size, precision=t_cfg.precision, clip_grad=o_cfg.clip_grad)
    ds_config["zero_allow_untested_optimizer"] = True  # LARS is a plain torch optimizer
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    augment = BatchAugment(cls, dist.device, seed=t_cfg.seed * 1000 + dist.rank)
    randaug = randaug_plan(cfg, cls)[1] or getattr(loader, "randaug_info", "off")
    flops_per_img = classifier_flops(model, trainable_encoder=not probe)
    peak = peak_tflops(override=t_cfg.peak_tflops) if dist.device.type == "cuda" else None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log0(dist, f"{what} | preset {cfg.preset} | {dist.world_size} rank(s) on {dist.device.type} | ZeRO stage "
               f"{stage} | precision {t_cfg.precision} | data={loader.backend}")
    log0(dist, f"weights: {checkpoint_path or '(none)'} -> {source}")
    log0(dist, f"model: img {cfg.model.img_size} patch {cfg.model.patch_size} dim {cfg.model.embed_dim} depth "
               f"{cfg.model.depth} | {cls.num_classes} classes | pool {'avg+fc_norm' if cls.global_pool else 'cls'}"
               f" | {n_train / 1e6:.2f} M trainable | optimizer {type(optimizer).__name__}"
               + ("" if probe else f" | layer decay {cls.layer_decay} | drop path {cls.drop_path}"))
    log0(dist, f"augment: RandomResizedCrop({cfg.data.crop_scale_min}-{cfg.data.crop_scale_max}) + flip | "
               f"RandAugment: {randaug} | batch: {augment.describe()}")
    log0(dist, f"batch: micro {micro} x accum {grad_accum} x ranks {dist.world_size} = {t_cfg.batch_size} | lr "
               f"{lr:.3e} | warmup {warmup_steps} of {total_steps} steps | this run: {budget} steps | "
               f"validation: {val_shards or 'none'}")

    # ---- resume
    step, best, history = 0, -1.0, []
    found = ckpt.find_resume(t_cfg.resume, ckpt_dir)
    if found is not None:
        state = ckpt.load(engine, *found, dist.world_size)
        step, best = int(state["step"]), float(state.get("best_acc1", -1.0))
        history = list(state.get("history", []))
        loader.load_state_dict(state["data"])
        log0(dist, f"resumed from {found[0] / found[1]} at step {step} (best top-1 so far {best:.2f}%)")
    else:
        loader.set_epoch(0)

    logger = MetricsLogger(out_dir, enabled=dist.is_main)
    dev = dist.device
    loss_sum = torch.zeros((), device=dev)
    n_loss, imgs_seen, data_wait = 0, 0, 0.0
    t_last = time.perf_counter()
    losses: list[float] = []
    micro_step = step * grad_accum
    checked_labels = False
    engine.train()

    def end_of_epoch(epoch_done: int, final: bool) -> None:
        nonlocal best
        stats: dict[str, Any] = {}
        if val_loader is not None and (epoch_done % cls.eval_interval == 0 or final):
            stats = evaluate(engine.module, val_loader, dev)
            stats.update(epoch=epoch_done, step=step)
            history.append(stats)
            is_best = stats["acc1"] > best
            best = max(best, stats["acc1"])
            log0(dist, f"epoch {epoch_done} | val top-1 {stats['acc1']:.2f}% top-5 {stats['acc5']:.2f}% loss "
                       f"{stats['loss']:.4f} ({stats['count']} images) | best top-1 {best:.2f}%")
            logger.log({"step": step, "epoch": epoch_done, "val_acc1": stats["acc1"], "val_acc5": stats["acc5"],
                        "val_loss": stats["loss"]})
            sd = full_fp32_state_dict(engine, stage) if (is_best or final) else None
            if dist.is_main and sd is not None:
                blob = {"model": sd, "config": cfg.to_dict(), "cls": dataclasses.asdict(cls), "step": step,
                        "epoch": epoch_done, "acc1": stats["acc1"], "acc5": stats["acc5"],
                        "classifier": {"num_classes": cls.num_classes, "global_pool": cls.global_pool,
                                       "head_bn": probe}}
                if is_best:
                    torch.save(blob, out_dir / "best.pth")
                if final:
                    torch.save(blob, out_dir / "last.pth")
        state = {"step": step, "epoch": loader.epoch, "data": loader.state_dict(), "world_size": dist.world_size,
                 "seed": t_cfg.seed, "micro_step": micro_step, "config": full_config(cfg, cls),
                 "best_acc1": best, "history": history}
        tag = ckpt.save(engine, ckpt_dir, step, state, t_cfg.keep_last, dist.is_main)
        log0(dist, f"saved checkpoint {ckpt_dir / tag}")

    done = step >= budget
    while not done:
        epoch = loader.epoch
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                imgs, labels = next(it)
            except StopIteration:
                break
            data_wait += time.perf_counter() - t0
            if not checked_labels:  # one host sync, once: labels must fit the head
                top = int(labels.max())
                if top >= cls.num_classes:
                    raise ConfigError(f"label {top} does not fit cls.num_classes={cls.num_classes}; set "
                                      "cls.num_classes to the dataset's number of classes")
                checked_labels = True
            imgs, targets, weight = augment(imgs, labels)
            logits = engine(imgs)
            loss = soft_target_cross_entropy(logits, targets, weight)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
            n_loss += 1
            micro_step += 1
            imgs_seen += imgs.shape[0]
            if micro_step % grad_accum:
                continue
            step += 1
            if step % t_cfg.log_interval == 0 or step == budget:
                elapsed = time.perf_counter() - t_last
                mean_loss = float(loss_sum) / max(1, n_loss)
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"non-finite training loss at step {step}; lower the lr or set "
                                             "optim.clip_grad")
                img_s = imgs_seen / elapsed
                tflops = flops_per_img * img_s / 1e12
                rec = {"step": step, "epoch": micro_step / micro_per_epoch, "loss": mean_loss,
                       "lr": scheduler.get_last_lr()[0] / optimizer.param_groups[0].get("lr_scale", 1.0)
                       if not probe else scheduler.get_last_lr()[0],
                       "img_per_s": img_s * dist.world_size, "tflops": tflops,
                       "mfu": tflops / peak if peak else None, "data_wait": data_wait / elapsed}
                losses.append(mean_loss)
                line = (f"step {step} | epoch {rec['epoch']:.2f} | loss {mean_loss:.4f} | lr {rec['lr']:.3e} | "
                        f"{rec['img_per_s']:.1f} img/s | {tflops:.2f} TFLOP/s | data {100 * rec['data_wait']:.0f}%")
                logger.log(rec, line)
                loss_sum.zero_()
                n_loss = imgs_seen = 0
                data_wait = 0.0
                t_last = time.perf_counter()
            if step >= budget:
                done = True
                break
        if not done:  # a whole epoch ran
            if loader.batch_in_epoch != 0:
                loader.set_epoch(epoch + 1)
            end_of_epoch(epoch + 1, final=False)
    end_of_epoch(loader.epoch + (1 if loader.batch_in_epoch else 0), final=True)
    logger.close()
    log0(dist, f"done: {step} steps | best val top-1 {best:.2f}% | {out_dir}")
    return {"step": step, "losses": losses, "history": history, "best_acc1": best, "output_dir": str(out_dir)}


def main(argv: list[str] | None = None, probe: bool = False) -> int:
    """Command-line entry of fine-tuning (and, with ``probe=True``, of linear probing)."""
    from fastmae.interop import UnsafeCheckpointError

    if probe:
        from fastmae.linprobe import DESCRIPTION, linprobe_recipe

        prog, desc, recipe = "fastmae/linprobe.py", DESCRIPTION, linprobe_recipe
    else:
        prog, desc, recipe = "fastmae/finetune.py", __doc__.split("\n\n")[0], finetune_recipe
    try:
        args, cfg, cls, loaded = parse_program_args(prog, desc, recipe, argv)
    except (ConfigError, UnsafeCheckpointError, ValueError, FileNotFoundError) as e:
        print(f"fastmae: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(full_config(cfg, cls), indent=2, sort_keys=True))
        return 0
    try:
        run(cfg, cls, args.ds_config, loaded, probe=probe, checkpoint_path=args.checkpoint)
    except (ConfigError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"fastmae: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
