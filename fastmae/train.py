"""MAE pre-training with DeepSpeed: ``deepspeed fastmae/train.py --ds_config zero2.json [--preset P] [k=v ...]``
(torchrun, srun and mpirun work too). It supplies the MAE task -- data, model, AdamW, the masked-patch loss --
to the shared :class:`~fastmae.trainer.Trainer`, which runs the loop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmae.attention import resolve_attention_backend
from fastmae.cli import program_parser
from fastmae.config import Config, ConfigError, apply_overrides, build_config, config_from_dict, preset_names
from fastmae.data import build_loader
from fastmae.flops import train_flops
from fastmae.knn import KnnMonitor
from fastmae.memory import MemoryEstimate, estimate_memory
from fastmae.model import MaskedAutoencoderViT, resolve_masking_backend
from fastmae.optim import build_adamw, param_groups
from fastmae.seeding import mask_seed
from fastmae.trainer import EXIT_CONFIG, NonFiniteLossError, Task, Trainer, describe_loader

__all__ = ["NonFiniteLossError", "PretrainTask", "main", "make_loader", "parse_args"]

PROGRAM = "pre-training"
# keys pre-training does not use: refused when given
IGNORED = {"cls": "the cls section configures fine-tuning and linear probing"}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    ap = program_parser("fastmae/train.py", "MAE pre-training. Extra arguments are config overrides: section.key=value "
                        "or --section.key value (sections: model, mask, data, optim, train).", "debug",
                        f"one of: {', '.join(preset_names())}")
    args, rest = ap.parse_known_args(argv)
    if args.config:
        cfg = config_from_dict(json.loads(Path(args.config).read_text()))
        apply_overrides(cfg, rest, IGNORED, PROGRAM)
    else:
        cfg = build_config(args.preset, rest, IGNORED, PROGRAM)
    return args, cfg


def make_loader(cfg: Config, rank: int, world_size: int, device: torch.device) -> Any:
    """The configured loader for this rank (DALI / torch / synthetic)."""
    return build_loader(cfg.data, img_size=cfg.model.img_size, rank=rank, world_size=world_size,
                        seed=cfg.train.seed, device=device, mode="train")


class PretrainTask(Task):
    """MAE pre-training: masked-patch reconstruction, AdamW (paper Table 8), one mask seed per micro batch; with
    ``knn.interval`` > 0 the k-NN monitor (:class:`fastmae.knn.KnnMonitor`) at epoch ends."""

    name = PROGRAM
    ignored = IGNORED

    def __init__(self) -> None:
        self._seed: torch.Tensor | None = None  # the mask seed of the current micro batch, on the device
        self.knn = KnnMonitor()

    def build_loaders(self, tr: Trainer) -> tuple[Any, None]:
        return make_loader(tr.cfg, tr.dist.rank, tr.dist.world_size, tr.dist.device), None

    def build_model(self, tr: Trainer) -> nn.Module:
        return MaskedAutoencoderViT(tr.cfg.model, tr.cfg.mask)

    def memory_estimate(self, tr: Trainer, zero_stage: int, activation_checkpointing: bool) -> MemoryEstimate:
        c = tr.cfg
        return estimate_memory(c.model, c.mask.ratio, c.data.batch_size, zero_stage, tr.dist.world_size,
                               c.train.precision, activation_checkpointing, c.model.attention,
                               tr.reduce_bucket_size, tr.plan.grad_accum)

    def build_optimizer(self, tr: Trainer, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        groups = param_groups(model, tr.cfg.optim.weight_decay, model.no_weight_decay())
        return build_adamw(groups, tr.cfg.optim, lr, tr.dist.device)

    def loss(self, tr: Trainer, imgs: torch.Tensor, labels: torch.Tensor, micro_id: int) -> torch.Tensor:
        # the mask of a global micro batch is a pure function of (seed, micro batch): resumed runs, and runs of
        # any shape (1 rank x accumulation 2 = 2 ranks x accumulation 1), mask the same samples the same way.
        # The seed travels as a device tensor written by a fill kernel: no host sync, and a compiled step sees
        # one input rather than a new constant (a recompile) each micro batch
        if self._seed is None or self._seed.device != imgs.device:
            self._seed = torch.zeros((), dtype=torch.int64, device=imgs.device)
        self._seed.fill_(mask_seed(tr.cfg.train.seed, micro_id))
        loss, _, _ = tr.engine(imgs, mask_seed=self._seed)
        return loss

    def flops_per_image(self, tr: Trainer) -> float:
        return train_flops(tr.cfg.model, tr.cfg.mask.ratio)

    def describe(self, tr: Trainer) -> list[str]:
        c, dev = tr.cfg, tr.dist.device
        act = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[c.train.precision]
        return [f"backends: masking={resolve_masking_backend(c.mask.backend, dev)} "
                f"attention={resolve_attention_backend(c.model.attention, dev, act)} "
                f"data={describe_loader(tr.loader)}", *self.knn.describe(tr)]

    def on_epoch_end(self, tr: Trainer, epoch_done: int, final: bool) -> bool:
        self.knn.on_epoch_end(tr, epoch_done, final)  # every knn.interval epochs and at the end (0 = off)
        return False

    def summary(self) -> dict[str, Any]:
        return {"knn": self.knn.history} if self.knn.history else {}


def train(cfg: Config, ds_config_name: str = "zero2.json") -> dict[str, Any]:
    """Run pre-training in this process (the process group is started if needed); returns a summary."""
    return Trainer(cfg, PretrainTask(), ds_config_name).fit()


def main(argv: list[str] | None = None, hooks: list[Any] | None = None) -> int:
    """Command-line entry; returns the exit status (see :mod:`fastmae.trainer`)."""
    try:
        args, cfg = parse_args(argv)
    except (ConfigError, OSError, ValueError) as e:
        print(f"fastmae: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(cfg.to_json())
        return 0
    trainer = Trainer(cfg, PretrainTask(), args.ds_config)
    trainer.batch_hooks.extend(hooks or [])
    return trainer.run()


if __name__ == "__main__":
    raise SystemExit(main())
