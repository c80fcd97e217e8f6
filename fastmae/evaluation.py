"""Top-1 / top-5 accuracy of a classifier, during fine-tuning / probing and as an evaluation-only mode that
runs a fine-tuned or probed checkpoint, unchanged, on any labelled shard set (e.g. ImageNet variants):
``python -m fastmae.evaluation --checkpoint runs/finetune/best.pth --shards /data/imagenet-a/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastmae.data import build_loader
from fastmae.data.sample import bundled_sample_dir

from .config import ConfigError, DataConfig, ModelConfig, get_preset
from .data import PAD_LABEL  # label of padding samples (never counted)
from .interop import checkpoint_kind, infer_model_config, load_checkpoint
from .vit import VisionTransformer, build_classifier


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device | str, max_batches: int = 0) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 (in %) over one pass of ``loader`` (summed over ranks).

    One host sync at the end; ``max_batches`` > 0 stops early (tests, smoke runs).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct@1, correct@5, count
    loader.set_epoch(0)
    for i, (imgs, labels) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        imgs = imgs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(imgs).float()  # (B, C)
        valid = labels != PAD_LABEL
        safe = labels.clamp(min=0)
        loss = F.cross_entropy(logits, safe, reduction="none")  # (B,)
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices  # (B, k)
        hit = topk == safe[:, None]  # (B, k)
        sums[0] += (loss * valid).sum()
        sums[1] += (hit[:, 0] & valid).sum()
        sums[2] += (hit.any(dim=1) & valid).sum()
        sums[3] += valid.sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    loss_sum, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "count": int(sums[3])}


def load_classifier(path: str | Path, preset: str = "mae_vit_large_patch16",
                    attention: str = "auto") -> tuple[VisionTransformer, dict[str, Any]]:
    """A classifier with all weights from ``path`` (fastmae classifier file or timm ViT classifier)."""
    sd, meta = load_checkpoint(path)
    if checkpoint_kind(sd) != "classifier":
        raise ValueError(f"{path} has no classification head ({checkpoint_kind(sd)}); evaluate a fine-tuned or "
                         "linear-probed model (best.pth of fastmae.finetune / fastmae.linprobe)")
    info = meta.get("classifier") or {}
    head_bn = bool(info.get("head_bn", "head.1.weight" in sd))
    head_w = sd["head.1.weight"] if head_bn else sd["head.weight"]
    global_pool = bool(info.get("global_pool", "fc_norm.weight" in sd))
    m: ModelConfig = infer_model_config(sd, meta, get_preset(preset).model)
    m.attention = attention
    model = build_classifier(m, int(head_w.shape[0]), global_pool=global_pool, head_bn=head_bn)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and "running" not in k and "num_batches" not in k]
    if missing:
        raise ValueError(f"{path} lacks {missing[:5]} for a {'global-pool' if global_pool else 'cls-token'} ViT")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return model.eval(), meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmae.evaluation",
                                 description="Top-1/top-5 of a fine-tuned model on a labelled shard set.")
    ap.add_argument("--checkpoint", required=True, help="best.pth of fastmae.finetune/linprobe, or a timm ViT")
    ap.add_argument("--shards", default="",
                    help="shard directory / brace pattern; '' = the bundled sample's val split")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--backend", default="auto", help="data backend: auto | dali | torch")
    ap.add_argument("--num_workers", type=int, default=4)
    ap.add_argument("--preset", default="mae_vit_large_patch16",
                    help="architecture for what the weights cannot tell (unusual head counts)")
    ap.add_argument("--max_batches", type=int, default=0, help="stop after this many batches (0 = all)")
    args = ap.parse_args(argv)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    try:
        model, meta = load_classifier(args.checkpoint, args.preset)
        shards = args.shards
        if not shards:
            shards = str(bundled_sample_dir("val"))
        data = DataConfig(backend=args.backend, shards=shards, batch_size=args.batch_size,
                          num_workers=args.num_workers)
        loader = build_loader(data, img_size=model.patch_embed.img_size, rank=rank, world_size=world,
                              device=device, mode="eval", labels=True)
        stats = evaluate(model.to(device), loader, device, args.max_batches)
    except (ValueError, FileNotFoundError, ConfigError, RuntimeError) as e:
        print(f"fastmae.evaluation: {e}", file=sys.stderr)
        return 1
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"{args.checkpoint} on {shards}: top-1 {stats['acc1']:.2f}% | top-5 {stats['acc5']:.2f}% | "
              f"loss {stats['loss']:.4f} | {stats['count']} images (backend {loader.backend})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
