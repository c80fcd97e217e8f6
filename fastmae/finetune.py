"""End-to-end fine-tuning of a pre-trained MAE encoder for classification with DeepSpeed, on the paper's
Table 9 recipe (validation every epoch, ``best.pth`` kept) and the shared trainer:
``deepspeed fastmae/finetune.py --ds_config zero2.json --checkpoint PATH [--preset P] [k=v ...]``, where
``PATH`` is a fastmae export or run folder or an official ``mae_pretrain_vit_*.pth``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmae.augment import BatchAugment, randaug_plan, soft_target_cross_entropy
from fastmae.cli import program_parser
from fastmae.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    preset_names,
)
from fastmae.data import build_loader
from fastmae.data.sample import bundled_sample_dir
from fastmae.evaluation import evaluate
from fastmae.flops import block_flops, classifier_flops
from fastmae.interop import UnsafeCheckpointError, checkpoint_kind, infer_model_config, load_checkpoint
from fastmae.lars import LARS
from fastmae.memory import MemoryEstimate, estimate_memory
from fastmae.optim import build_adamw, param_groups
from fastmae.recipes import (
    FINETUNE_DESCRIPTION,
    IGNORED,
    PROBE_DESCRIPTION,
    PROBE_IGNORED,
    auto_preset,
    finetune_recipe,
    linprobe_recipe,
)
from fastmae.trainer import EXIT_CONFIG, Task, Trainer, describe_loader
from fastmae.vit import VisionTransformer, build_classifier, layer_decay_scale

# the pre-training resolution of the official checkpoints: fp16 fine-tuning above it gets a start-up warning
FP16_SAFE_IMG_SIZE = 224


def parse_program_args(prog: str, description: str, recipe: Callable[[str], Config], argv: list[str] | None,
                       ignored: dict[str, str] | None = None) -> tuple[argparse.Namespace, Config, Any]:
    """Common command line of fine-tuning and probing; returns (args, cfg, (state dict, meta) or None)."""
    ap = program_parser(prog, description, "auto",
                        f"recipe: auto (from the checkpoint) or one of: {', '.join(preset_names())}")
    ap.add_argument("--checkpoint", default="",
                    help="pre-trained weights: fastmae export (.pth), fastmae run/checkpoint directory, official "
                         "mae_pretrain_vit_*.pth; '' = random init (smoke tests only)")
    args, rest = ap.parse_known_args(argv)
    ignored = IGNORED if ignored is None else ignored
    loaded = None
    if args.checkpoint:
        loaded = load_checkpoint(args.checkpoint)
    if args.config:
        cfg = config_from_dict(json.loads(Path(args.config).read_text()))
    else:
        preset = args.preset if args.preset != "auto" else auto_preset(*(loaded or (None, {})))
        cfg = recipe(preset)
    if loaded is not None:  # the checkpoint's architecture wins over the preset's
        attention = cfg.model.attention
        cfg.model = infer_model_config(loaded[0], loaded[1], cfg.model)
        cfg.model.attention = attention
    apply_overrides(cfg, rest, ignored, prog.split("/")[-1].removesuffix(".py"))
    return args, cfg, loaded


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
    cls = cfg.cls
    train = build_loader(cfg.data, img_size=cfg.model.img_size, rank=rank, world_size=world_size,
                         seed=cfg.train.seed, device=device, mode="train", randaug=randaug_plan(cfg)[0],
                         labels=True)
    val_shards = cls.val_shards
    if not val_shards and not cfg.data.shards and cfg.data.backend != "synthetic":
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
    """The classifier with the pre-trained encoder loaded and a freshly initialised head; with
    ``cls.finetune_blocks`` >= 0 (fine-tuning) everything before the last that many blocks is frozen
    (:meth:`VisionTransformer.freeze_prefix`)."""
    cls = cfg.cls
    model = build_classifier(cfg.model, cls.num_classes, global_pool=cls.global_pool,
                             drop_path=0.0 if probe else cls.drop_path, head_bn=probe)
    source = "random init"
    if loaded is not None:
        sd, _ = loaded
        kind = checkpoint_kind(sd)
        missing = model.load_encoder(sd)
        head_keys = {k for k in missing if k.startswith("head")}
        if head_keys:
            model.init_head(cls.head_init_std)
        source = f"{kind} checkpoint (fresh: {', '.join(sorted(missing)) or 'nothing'})"
    if probe:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    elif cls.finetune_blocks >= 0:
        model.freeze_prefix(cls.finetune_blocks)
    return model, source


def describe_trainable(model: VisionTransformer, finetune_blocks: int, probe: bool) -> str:
    """What trains, for the start-up log: parameter counts and, under partial fine-tuning, which blocks."""
    def numel(p: torch.Tensor) -> int:  # a ZeRO-3 partitioned parameter's numel() is 0: its full size
        return int(getattr(p, "ds_numel", p.numel()))

    n_train = sum(numel(p) for p in model.parameters() if p.requires_grad)
    n_all = sum(numel(p) for p in model.parameters())
    what = f"{n_train / 1e6:.2f} M trainable ({n_train:,} of {n_all:,} parameters)"
    if not probe and finetune_blocks >= 0:
        depth = len(model.blocks)
        what += (f" | partial fine-tuning: the last {finetune_blocks} of {depth} blocks + norm + head train; "
                 "the embeddings and the first "
                 f"{depth - finetune_blocks} blocks are frozen and run without a backward graph")
    return what


def fp16_resolution_warning(cfg: Config) -> str:
    """A start-up warning for fp16 at high resolution ("" when none applies)."""
    if cfg.train.precision != "fp16" or cfg.model.img_size <= FP16_SAFE_IMG_SIZE:
        return ""
    return (f"warning: train.precision=fp16 at model.img_size={cfg.model.img_size}: fp16 fine-tuning above "
            f"{FP16_SAFE_IMG_SIZE} px (e.g. ViT-H at 448) has been seen to end in NaN losses with the official code "
            "(fp16 overflows above 65504; loss scaling guards the gradients, not the forward pass); "
            "train.precision=bf16 (the default) has fp32's range")


def classifier_optimizer(model: nn.Module, cfg: Config, lr: float, device: torch.device,
                         probe: bool) -> torch.optim.Optimizer:
    """LARS over the head (probing) or AdamW with layer-wise lr decay (fine-tuning), over the parameters that
    train (``requires_grad``) and no other."""
    o = cfg.optim
    if probe:
        head = [p for p in model.parameters() if p.requires_grad]
        return LARS([{"params": head, "lr": lr}], lr=lr, weight_decay=o.weight_decay, momentum=o.beta1)
    depth, decay = len(model.blocks), cfg.cls.layer_decay
    groups = param_groups(model, o.weight_decay, model.no_weight_decay(),
                          lr_scale=lambda n: layer_decay_scale(n, depth, decay))
    return build_adamw(groups, o, lr, device)


def finetune_flops(model: VisionTransformer, finetune_blocks: int, probe: bool) -> float:
    """Training FLOPs per image: the whole encoder's backward (fine-tuning), the head's only (probing), or,
    under partial fine-tuning, the frozen prefix's forward and the last ``finetune_blocks`` blocks' backward."""
    if probe or finetune_blocks < 0:
        return classifier_flops(model, trainable_encoder=not probe)
    D, N = model.embed_dim, model.patch_embed.num_patches
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / D
    return classifier_flops(model, trainable_encoder=False) + 2 * finetune_blocks * block_flops(N + 1, D, mlp_ratio)


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

    def build_loaders(self, tr: Trainer) -> tuple[Any, Any | None]:
        d = tr.dist
        train, val, self.val_shards = make_loaders(tr.cfg, d.rank, d.world_size, d.device)
        self.augment = BatchAugment(tr.cfg.cls, d.device)
        return train, val

    def build_model(self, tr: Trainer) -> nn.Module:
        model, self.source = build_model(tr.cfg, self.loaded, self.probe)
        return model

    def memory_estimate(self, tr: Trainer, zero_stage: int, activation_checkpointing: bool) -> MemoryEstimate:
        """The encoder on every patch, no decoder (an approximation for the classifier)."""
        c = tr.cfg
        m = dataclasses.replace(c.model, encoder_mask_tokens=True, decoder_depth=0)
        trainable = None if self.probe or c.cls.finetune_blocks < 0 else c.cls.finetune_blocks
        return estimate_memory(m, 0.5, c.data.batch_size, zero_stage, tr.dist.world_size, c.train.precision,
                               activation_checkpointing, c.model.attention, tr.reduce_bucket_size,
                               tr.plan.grad_accum, trainable_blocks=trainable)

    def build_optimizer(self, tr: Trainer, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """LARS over the head (probing) or AdamW with layer decay (fine-tuning), over the trainable parameters
        only: a frozen one is in no group (DeepSpeed then keeps no gradient, fp32 copy or state for it)."""
        return classifier_optimizer(model, tr.cfg, lr, tr.dist.device, self.probe)

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
        return finetune_flops(tr.engine.module, -1 if self.probe else tr.cfg.cls.finetune_blocks, self.probe)

    def describe(self, tr: Trainer) -> list[str]:
        c, m = tr.cfg, tr.engine.module
        randaug = randaug_plan(c)[1] or getattr(tr.loader, "randaug_info", "off")
        lines = [
            f"data={describe_loader(tr.loader)} | weights: {self.checkpoint_path or '(none)'} -> {self.source}",
            f"model: img {c.model.img_size} patch {c.model.patch_size} dim {c.model.embed_dim} depth "
            f"{c.model.depth} | {c.cls.num_classes} classes | pool {'avg+fc_norm' if c.cls.global_pool else 'cls'}"
            f" | optimizer {type(tr.optimizer).__name__}"
            + ("" if self.probe else f" | layer decay {c.cls.layer_decay} | drop path {c.cls.drop_path}"),
            f"trains: {describe_trainable(m, c.cls.finetune_blocks, self.probe)}",
            f"augment: RandomResizedCrop({c.data.crop_scale_min}-{c.data.crop_scale_max}) + flip | "
            f"RandAugment: {randaug} | batch: {self.augment.describe()} | validation: {self.val_shards or 'none'}",
        ]
        warning = fp16_resolution_warning(c)
        return [*lines, warning] if warning else lines

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
    if probe:
        prog, desc, recipe, ignored = "fastmae/linprobe.py", PROBE_DESCRIPTION, linprobe_recipe, PROBE_IGNORED
    else:
        prog, desc, recipe, ignored = "fastmae/finetune.py", FINETUNE_DESCRIPTION, finetune_recipe, IGNORED
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
