"""The classifier recipes: fine-tuning (paper Table 9, the official FINETUNE.md values per architecture) and
linear probing (paper Table 10, the official ``main_linprobe.py``), with the keys each program refuses."""

from __future__ import annotations

from typing import Any

import torch

from fastmae.config import ClassifierConfig, Config, get_preset, preset_names
from fastmae.interop import TIMM_SIZES, infer_model_config

FINETUNE_DESCRIPTION = "End-to-end fine-tuning of a pre-trained MAE encoder for classification, with DeepSpeed."
PROBE_DESCRIPTION = "MAE linear probing: frozen encoder, BatchNorm (no affine) + linear head, LARS."

# keys fine-tuning and probing do not use: refused when given
IGNORED = {
    "mask": "classifiers see every patch: no masking",
    "model.decoder_embed_dim": "the classifier has no decoder",
    "model.decoder_depth": "the classifier has no decoder",
    "model.decoder_num_heads": "the classifier has no decoder",
    "model.norm_pix_loss": "a pre-training loss setting",
    "model.encoder_mask_tokens": "a pre-training benchmark variant",
    "knn": "the k-NN monitor runs during pre-training (python -m fastmae.evaluation --knn scores any encoder)",
}
PROBE_IGNORED = {
    **IGNORED,
    "cls.drop_path": "the encoder is frozen",
    "cls.layer_decay": "only the head trains",
    "cls.finetune_blocks": "the encoder is frozen: only the head trains (cls.finetune_blocks=0 in fine-tuning "
                           "trains the head and the final norm)",
    "train.activation_checkpointing": "the encoder is frozen: nothing is recomputed",
}


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


def linprobe_recipe(preset: str) -> Config:
    """Preset architecture + the official linear-probing recipe, ``cls`` section included."""
    cfg = finetune_recipe(preset)
    cls = cfg.cls = ClassifierConfig(global_pool=False, drop_path=0.0, layer_decay=1.0, smoothing=0.0, mixup=0.0,
                           cutmix=0.0, reprob=0.0, randaug="", head_init_std=0.01)
    o, t = cfg.optim, cfg.train
    o.base_lr, o.lr, o.weight_decay, o.min_lr, o.warmup_epochs, o.beta1 = 0.1, None, 0.0, 0.0, 10.0, 0.9
    t.epochs, t.batch_size, t.output_dir = 90, 16384, "runs/linprobe"
    if preset == "debug":
        cls.num_classes = 10
        cfg.data.batch_size, t.batch_size, t.epochs = 16, 16, 3
        o.lr, o.warmup_epochs = 0.1, 1.0
        t.output_dir = "runs/debug_linprobe"
    return cfg


def auto_preset(sd: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> str:
    """The preset whose recipe fits a checkpoint: its fastmae preset, else the official size, else debug."""
    cfg_d = meta.get("config")
    if isinstance(cfg_d, dict) and cfg_d.get("preset") in preset_names():
        return str(cfg_d["preset"])
    if sd is not None:
        m = infer_model_config(sd, meta)
        size = TIMM_SIZES.get((m.embed_dim, m.depth, m.num_heads))
        name = f"mae_vit_{size}_patch{m.patch_size}"
        if name in preset_names():
            return name
    return "debug"
