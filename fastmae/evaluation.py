"""Top-1 / top-5 accuracy of a classifier, during fine-tuning / probing and as an evaluation-only mode that
runs a fine-tuned or probed checkpoint, unchanged, on any labelled shard set:
``python -m fastmae.evaluation --checkpoint runs/finetune/best.pth --shards /data/imagenet-sketch/``; the
robustness benchmarks as their authors score them (``--subset imagenet-a|imagenet-r``, ``--imagenet-c ROOT``:
:mod:`fastmae.robustness`), and the weighted k-NN accuracy of a pre-trained encoder (``--knn``:
:mod:`fastmae.knn`). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastmae.data import build_loader
from fastmae.data.sample import bundled_sample_dir

from . import knn as knn_mod
from . import robustness as rob
from .config import KNN_FEATURES, ConfigError, DataConfig, KnnConfig, ModelConfig, get_preset, validate_knn
from .data import PAD_LABEL  # label of padding samples (never counted)
from .interop import checkpoint_kind, infer_model_config, load_checkpoint
from .vit import VisionTransformer, build_classifier

# (logits, labels) -> (logits, labels) applied to every batch before scoring, e.g. a class subset's columns
Adapt = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device | str, max_batches: int = 0,
             adapt: Adapt | None = None) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 (in %) over one pass of ``loader`` (summed over ranks).

    One host sync at the end (``adapt`` may add its own); ``max_batches`` > 0 stops early (tests, smoke runs);
    ``adapt`` maps each batch's logits and labels before scoring (:class:`fastmae.robustness.SubsetLogits`).
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
        if adapt is not None:
            logits, labels = adapt(logits, labels)  # e.g. (B, 200) and labels in subset space
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
                         "linear-probed model (best.pth of fastmae.finetune / fastmae.linprobe), or score a "
                         "pre-trained encoder with --knn")
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


def shard_scorer(model: nn.Module, data: DataConfig, device: torch.device | str, rank: int = 0, world_size: int = 1,
                 max_batches: int = 0, adapt: Adapt | None = None) -> Callable[[str], dict[str, Any]]:
    """``score(shards) -> stats`` of :func:`evaluate` (plus ``backend``) for ``model`` on one shard set, read with
    ``data``'s loader settings (centre crops at the model's image size)."""
    img_size = model.patch_embed.img_size

    def score(shards: str) -> dict[str, Any]:
        loader = build_loader(dataclasses.replace(data, shards=shards), img_size=img_size, rank=rank,
                              world_size=world_size, device=device, mode="eval", labels=True)
        try:
            stats: dict[str, Any] = evaluate(model, loader, device, max_batches, adapt)
        finally:
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        stats["backend"] = loader.backend
        return stats

    return score


# ----------------------------------------------------------------------------- command line


@dataclasses.dataclass
class Run:
    """What every mode of the command line shares: this process's rank and device, the loader settings."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    data: DataConfig


def build_parser() -> argparse.ArgumentParser:
    knn = KnnConfig()  # the k-NN defaults: the config's knn section
    ap = argparse.ArgumentParser(
        prog="python -m fastmae.evaluation",
        description="Top-1/top-5 of a fine-tuned model on a labelled shard set; ImageNet-A/-R on their 200-class "
                    "subsets; ImageNet-C corruption errors and mCE; weighted k-NN accuracy of a pre-trained encoder.")
    ap.add_argument("--checkpoint", required=True,
                    help="best.pth of fastmae.finetune/linprobe, or a timm ViT; with --knn a pre-trained MAE or "
                         "encoder (fastmae run or export, official mae_pretrain_vit_*.pth)")
    ap.add_argument("--shards", default="", help="shard directory / brace pattern; '' = the bundled sample's val split")
    ap.add_argument("--subset", choices=sorted(rob.SUBSET_FILES), default="",
                    help="score a 1000-class model on the dataset's 200 ImageNet-1k classes (logits restricted)")
    ap.add_argument("--labels", choices=rob.LABEL_SPACES, default="",
                    help="with --subset: the shards' labels are 0..199, the dataset's own class folders sorted "
                         "(subset, the default), or ImageNet-1k indices (1k)")
    ap.add_argument("--imagenet-c", default="", metavar="ROOT",
                    help="ROOT/<corruption>/<severity 1..5>/ shard folders: errors per set, CE, mCE")
    ap.add_argument("--knn", action="store_true", help="weighted k-NN top-1/top-5 of a pre-trained encoder")
    ap.add_argument("--train-shards", default="", help="with --knn: the feature bank ('' = bundled sample, train)")
    ap.add_argument("--val-shards", default="", help="with --knn: the queries ('' = bundled sample, val)")
    ap.add_argument("--k", type=int, default=knn.k, help="with --knn: neighbours per query")
    ap.add_argument("--temperature", type=float, default=knn.temperature, help="with --knn: T of exp(sim / T)")
    ap.add_argument("--features", choices=KNN_FEATURES, default=knn.features,
                    help="with --knn: cls token after the final norm, or the mean of the patch tokens after it")
    ap.add_argument("--max-images", type=int, default=knn.max_images,
                    help="with --knn: images read of each set (0 = all)")
    ap.add_argument("--json", default="", metavar="PATH", help="also write the results to this JSON file")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--backend", default="auto", help="data backend: auto | dali | torch")
    ap.add_argument("--num_workers", type=int, default=4)
    ap.add_argument("--preset", default="mae_vit_large_patch16",
                    help="architecture for what the weights cannot tell (unusual head counts)")
    ap.add_argument("--max_batches", type=int, default=0, help="stop after this many batches per set (0 = all)")
    return ap


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse combinations of options that one mode would silently ignore."""
    modes = [m for m, on in (("--subset", args.subset), ("--imagenet-c", args.imagenet_c), ("--knn", args.knn)) if on]
    if len(modes) > 1:
        ap.error(f"{' and '.join(modes)} are separate modes; choose one")
    if args.labels and not args.subset:
        ap.error("--labels applies to --subset only")
    if args.shards and (args.imagenet_c or args.knn):
        ap.error("--shards is not read with --imagenet-c (ROOT holds the sets) or --knn (--train-shards, --val-shards)")
    knn_only = [f"--{n.replace('_', '-')}" for n in ("train_shards", "val_shards") if getattr(args, n)]
    if knn_only and not args.knn:
        ap.error(f"{', '.join(knn_only)} apply to --knn only")
    if args.knn and args.max_batches:
        ap.error("--max_batches applies to the classifier modes; with --knn use --max-images")


def run_classifier(run: Run) -> tuple[str, dict[str, Any]]:
    """Plain or subset scoring of one shard set: (the line to print, the JSON record)."""
    a = run.args
    model, _ = load_classifier(a.checkpoint, a.preset)
    shards = a.shards or str(bundled_sample_dir("val"))
    adapt, what = None, ""
    if a.subset:
        subset = rob.class_subset(a.subset)
        labels = a.labels or "subset"
        rob.check_class_map(shards, subset, labels)
        adapt = rob.SubsetLogits(subset, labels)
        what = f" ({a.subset}: {len(subset)}-class subset, labels {labels})"
    score = shard_scorer(model.to(run.device), run.data, run.device, run.rank, run.world, a.max_batches, adapt)
    stats = score(shards)
    line = (f"{a.checkpoint} on {shards}{what}: top-1 {stats['acc1']:.2f}% | top-5 {stats['acc5']:.2f}% | "
            f"loss {stats['loss']:.4f} | {stats['count']} images (backend {stats['backend']})")
    record = {"mode": "subset" if a.subset else "plain", "checkpoint": str(a.checkpoint), "shards": shards, **stats}
    if a.subset:
        record.update(subset=a.subset, labels=a.labels or "subset")
    return line, record


def run_imagenet_c(run: Run) -> tuple[str, dict[str, Any]]:
    """Every (corruption, severity) set of ``--imagenet-c ROOT``: the table and the JSON record."""
    a = run.args
    sets, other = rob.find_imagenet_c(a.imagenet_c)
    model, _ = load_classifier(a.checkpoint, a.preset)
    score = shard_scorer(model.to(run.device), run.data, run.device, run.rank, run.world, a.max_batches)
    progress = run.rank == 0 and sys.stderr.isatty()
    errors, counts = rob.imagenet_c_errors(sets, score, progress=progress)
    report = rob.corruption_errors(errors)
    for name, r in report["corruptions"].items():
        r["images"] = {str(s): n for s, n in counts[name].items()}
    text = f"{a.checkpoint} on ImageNet-C {a.imagenet_c} (top-1 error %, CE %):\n{rob.format_imagenet_c(report)}"
    if other:
        text += f"\nleft out (not ImageNet-C corruptions): {', '.join(other)}"
    return text, {"mode": "imagenet-c", "checkpoint": str(a.checkpoint), "root": str(a.imagenet_c),
                  "left_out": other, **report}


def run_knn(run: Run) -> tuple[str, dict[str, Any]]:
    """Weighted k-NN of a pre-trained encoder: the line to print and the JSON record."""
    a = run.args
    cfg = KnnConfig(train_shards=a.train_shards, val_shards=a.val_shards, k=a.k, temperature=a.temperature,
                    features=a.features, max_images=a.max_images)
    validate_knn(cfg)
    encoder, meta = knn_mod.load_encoder(a.checkpoint, a.preset, features=a.features)
    stats = knn_mod.knn_evaluate(encoder.to(run.device), cfg, run.data, run.device, run.rank, run.world)
    bank, queries = knn_mod.set_shards(a.train_shards, "train"), knn_mod.set_shards(a.val_shards, "val")
    line = f"{a.checkpoint} ({meta['kind']}): {knn_mod.describe_knn(stats)} | bank {bank} | queries {queries}"
    return line, {"mode": "knn", "checkpoint": str(a.checkpoint), "kind": meta["kind"], "train_shards": bank,
                  "val_shards": queries, **stats}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    data = DataConfig(backend=args.backend, batch_size=args.batch_size, num_workers=args.num_workers)
    mode = run_knn if args.knn else run_imagenet_c if args.imagenet_c else run_classifier
    try:
        text, record = mode(Run(args, rank, world, device, data))
    except (ValueError, FileNotFoundError, ConfigError, RuntimeError) as e:
        print(f"fastmae.evaluation: {e}", file=sys.stderr)
        return 1
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(text)
        if args.json:
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
