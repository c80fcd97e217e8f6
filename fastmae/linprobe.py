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

from fastmae.finetune import main

if __name__ == "__main__":
    raise SystemExit(main(probe=True))
