"""Linear probing of a pre-trained MAE encoder, with DeepSpeed:

    deepspeed fastmae/linprobe.py --ds_config zero2.json --checkpoint PATH [--preset P] [k=v ...]

The official ``main_linprobe.py`` recipe (paper Table 10): the encoder is frozen (``requires_grad=False``,
no optimizer state), the head is ``BatchNorm1d(affine=False, eps=1e-6)`` followed by a linear layer on the
cls token (``cls.global_pool=false``), trained with LARS (lr 0.1 x batch / 256, weight decay 0, momentum
0.9 = ``optim.beta1``), 10 warm-up epochs of 90, batch 16384, RandomResizedCrop + flip only (no mixup,
cutmix, erasing, smoothing or RandAugment). The task, validation and ``best.pth`` are those of
:mod:`fastmae.finetune`, the loop is the shared :class:`~fastmae.trainer.Trainer`.
"""

from __future__ import annotations

from fastmae.config import ClassifierConfig, Config
from fastmae.finetune import finetune_recipe, main

DESCRIPTION = "MAE linear probing: frozen encoder, BatchNorm (no affine) + linear head, LARS."


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


if __name__ == "__main__":
    raise SystemExit(main(probe=True))
