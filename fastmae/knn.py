"""Weighted k-NN classification on frozen encoder features, as DINO's (Caron et al. 2021) monitor: every image's
feature (the cls token after the encoder's final norm, or the mean of its patch tokens after it; the encoder
sees every patch) is L2-normalised; each query takes its k most cosine-similar features of the bank, each
voting for its class with weight exp(similarity / T); top-1 / top-5 of the summed votes.

``python -m fastmae.evaluation --knn`` scores any pre-trained encoder; with ``knn.interval`` > 0 pre-training runs
:class:`KnnMonitor` every that many epochs and at the end. Features are gathered from every rank (each rank
then classifies a share of the queries), so any number of ranks gives the same scores; under ZeRO-3 the encoder's
partitioned weights are gathered into a plain copy first. See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from .config import DataConfig, KnnConfig, ModelConfig, get_preset
from .data import PAD_LABEL, build_loader, expand_shards  # PAD_LABEL: padding samples (dropped)
from .data.remote import is_remote
from .data.sample import bundled_sample_dir
from .interop import checkpoint_kind, infer_model_config, load_checkpoint
from .vit import VisionTransformer, build_classifier

if TYPE_CHECKING:
    from .task import Trainer

# similarities held at once by the classifier (query chunk x bank): 2^26 float32 values = 256 MiB
MAX_SIMILARITIES = 1 << 26


# ----------------------------------------------------------------------------- the encoder


def load_encoder(path: str | Path, preset: str = "mae_vit_large_patch16", attention: str = "auto",
                 features: str = "cls") -> tuple[VisionTransformer, dict[str, Any]]:
    """The encoder of a checkpoint (a fastmae run or export, an official ``mae_pretrain_vit_*.pth``, an encoder
    or classifier state dict) as a head-less :class:`VisionTransformer` in eval mode; returns (encoder, metadata
    with ``kind``)."""
    sd, meta = load_checkpoint(path)
    kind = checkpoint_kind(sd)
    m: ModelConfig = infer_model_config(sd, meta, get_preset(preset).model)
    m.attention = attention
    # a global-pool classifier has no final norm over the tokens, only fc_norm on their mean
    global_pool = "norm.weight" not in sd and "fc_norm.weight" in sd
    if global_pool and features == "cls":
        raise ValueError(f"{path} is a global-pool classifier without the encoder's final norm (norm.weight): its "
                         "cls token has no normalised feature; use features=pool (--features pool)")
    encoder = build_classifier(m, 0, global_pool=global_pool)
    missing = encoder.load_encoder(sd)
    lost = [k for k in missing if k.startswith(("norm.", "fc_norm."))]
    if lost:
        raise ValueError(f"{path} lacks the final norm {lost}: not a complete pre-trained encoder")
    return encoder.eval(), {**meta, "kind": kind}


def _full(p: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """The whole of parameter ``p`` within the context: gathered when ZeRO-3 partitions it (collective)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p], modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def encoder_copy(model: nn.Module, cfg: ModelConfig, device: torch.device | str) -> VisionTransformer:
    """A plain head-less :class:`VisionTransformer` (eval mode, float32, on ``device``) with the encoder weights of
    ``model`` (an :class:`~fastmae.model.MaskedAutoencoderViT`, e.g. a DeepSpeed engine's module, official names).
    Under ZeRO-3 every rank must call it: each parameter is gathered in turn. ``model`` itself is not touched."""
    encoder = build_classifier(cfg, 0, global_pool=False).to(device)
    own = encoder.state_dict()
    copied: set[str] = set()
    for name, p in model.named_parameters():
        if name not in own:
            continue  # decoder, mask tokens
        with _full(p):
            if tuple(p.shape) != tuple(own[name].shape):
                raise RuntimeError(f"encoder weight {name} has shape {tuple(p.shape)}, expected "
                                   f"{tuple(own[name].shape)} (a partitioned parameter that was not gathered?)")
            own[name].copy_(p.detach())
        copied.add(name)
    missing = sorted(set(own) - copied)
    if missing:
        raise RuntimeError(f"the model has no encoder weights {missing[:5]}: not an MAE encoder")
    return encoder.eval()


def encoder_features(encoder: VisionTransformer, imgs: torch.Tensor, features: str = "cls") -> torch.Tensor:
    """(B, 3, H, W) -> (B, D): ``cls`` = the cls token after the final norm, ``pool`` = the mean of the patch
    tokens after it (a global-pool classifier: its fc_norm of the mean). Every patch is seen: no masking."""
    tokens = encoder.forward_features(imgs)  # (B, 1+N, D)
    if encoder.global_pool:  # a classifier without the token norm: fc_norm(mean of the patch tokens)
        if features == "cls":
            raise ValueError("features=cls needs the encoder's final norm, which a global-pool classifier lacks")
        return encoder.pool(tokens)
    if features == "cls":
        return tokens[:, 0]
    if features == "pool":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"features={features!r} is not valid; valid: cls, pool")


# ----------------------------------------------------------------------------- features over ranks


def _world() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (N_r, ...) concatenated in rank order (ranks may hold different N_r); ``x`` itself on
    one process."""
    if _world() == 1:
        return x
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(_world())]
    tdist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros((max(counts) - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in counts]
    tdist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:c] for part, c in zip(parts, counts, strict=True)])


@torch.no_grad()
def extract_features(encoder: VisionTransformer, loader: Any, device: torch.device | str, features: str = "cls",
                     max_images: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) L2-normalised float32 features and (N,) labels of one pass of ``loader`` (padding dropped), from
    every rank: each rank returns the whole set. ``max_images`` > 0 reads whole global batches until at least
    that many images. The encoder's train/eval mode is restored."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    limit = math.ceil(max_images / (loader.batch_size * _world())) if max_images else 0
    feats, labs = [], []
    loader.set_epoch(0)
    try:
        for i, (imgs, labels) in enumerate(loader):
            if limit and i >= limit:
                break
            f = encoder_features(encoder, imgs.to(device, non_blocking=True), features)  # (B, D)
            feats.append(F.normalize(f.float(), dim=1))
            labs.append(labels.to(device, non_blocking=True))
    finally:
        encoder.train(was_training)
    width = encoder.embed_dim
    local_f = torch.cat(feats) if feats else torch.zeros(0, width, device=device)
    local_l = torch.cat(labs) if labs else torch.zeros(0, dtype=torch.long, device=device)
    all_f, all_l = all_gather_rows(local_f), all_gather_rows(local_l.long())
    keep = all_l != PAD_LABEL
    return all_f[keep], all_l[keep]


# ----------------------------------------------------------------------------- the classifier


@torch.no_grad()
def knn_votes(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float,
              num_classes: int, max_similarities: int = MAX_SIMILARITIES) -> torch.Tensor:
    """(Q, num_classes) float64 votes: for each query (rows L2-normalised, as the bank's), the sum over its ``k``
    most similar bank rows of exp(cosine similarity / ``temperature``), per class of those rows. Queries go in
    chunks so that at most ``max_similarities`` similarities exist at once."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k={k} and temperature={temperature} must be positive")
    k = min(k, bank.shape[0])
    chunk = max(1, max_similarities // max(1, bank.shape[0]))
    out = []
    with torch.autocast(bank.device.type, enabled=False):
        for start in range(0, queries.shape[0], chunk):
            sim = queries[start:start + chunk].float() @ bank.float().T  # (q, N)
            top, idx = sim.topk(k, dim=1)  # (q, k)
            weights = (top.double() / temperature).exp()  # float64: exp(1/T) overflows float32 below T ~ 0.012
            votes = torch.zeros(sim.shape[0], num_classes, dtype=torch.float64, device=sim.device)
            out.append(votes.scatter_add_(1, bank_labels[idx], weights))  # (q, C)
    if not out:
        return torch.zeros(0, num_classes, dtype=torch.float64, device=bank.device)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, k: int,
                 temperature: float, max_similarities: int = MAX_SIMILARITIES) -> dict[str, float]:
    """Top-1 / top-5 (%) of the weighted k-NN classifier on ``queries``; with several ranks (every rank holding
    the same bank and queries) each classifies a contiguous share of the queries and the hits are summed."""
    if bank.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError(f"k-NN needs images in both sets; got {bank.shape[0]} bank and {queries.shape[0]} queries")
    num_classes = max(int(bank_labels.max()), int(labels.max())) + 1
    world = _world()
    rank = tdist.get_rank() if world > 1 else 0
    share = math.ceil(queries.shape[0] / world)
    lo, hi = rank * share, min((rank + 1) * share, queries.shape[0])
    votes = knn_votes(bank, bank_labels, queries[lo:hi], k, temperature, num_classes, max_similarities)
    top = votes.topk(min(5, num_classes), dim=1).indices  # (q, 5)
    hit = top == labels[lo:hi, None]
    hits = torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).double()
    if world > 1:
        tdist.all_reduce(hits)
    n = queries.shape[0]
    c1, c5 = hits.tolist()
    return {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "count": n, "bank": int(bank.shape[0])}


# ----------------------------------------------------------------------------- a whole evaluation


def set_shards(shards: str, split: str) -> str:
    """The shards of a k-NN set ('' = the bundled sample's ``split``)."""
    return shards or str(bundled_sample_dir(split))


def knn_evaluate(encoder: VisionTransformer, knn: KnnConfig, data: DataConfig, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                 ) -> dict[str, Any]:
    """k-NN top-1 / top-5 of ``encoder`` with ``knn.train_shards`` as the bank and ``knn.val_shards`` as queries
    (read with ``data``'s loader settings, centre crops; '' = the bundled sample's train / val split). Features
    are extracted under ``autocast()``; the classifier runs in float32."""
    t0 = time.perf_counter()
    sets = {}
    for split, shards in (("train", knn.train_shards), ("val", knn.val_shards)):
        cfg = dataclasses.replace(data, shards=set_shards(shards, split))
        loader = build_loader(cfg, img_size=encoder.patch_embed.img_size, rank=rank, world_size=world_size,
                              seed=seed, device=device, mode="eval", labels=True)
        try:
            with autocast():
                sets[split] = extract_features(encoder, loader, device, knn.features, knn.max_images)
        finally:
            close = getattr(loader, "close", None)
            if close is not None:
                close()
    stats: dict[str, Any] = knn_accuracy(*sets["train"], *sets["val"], knn.k, knn.temperature)
    stats.update(k=knn.k, temperature=knn.temperature, features=knn.features, seconds=time.perf_counter() - t0)
    return stats


def describe_knn(stats: dict[str, Any]) -> str:
    return (f"k-NN top-1 {stats['acc1']:.2f}% top-5 {stats['acc5']:.2f}% (k={stats['k']}, T={stats['temperature']}, "
            f"{stats['features']} features; {stats['bank']} bank / {stats['count']} query images, "
            f"{stats['seconds']:.1f} s)")


class KnnMonitor:
    """Pre-training's k-NN monitor (``knn`` config section): every ``knn.interval`` epochs and after the last
    step, on a plain copy of the encoder (the training model and its train/eval mode are untouched), logged as
    ``knn_acc1`` / ``knn_acc5`` (console, metrics.jsonl, trackers)."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self._last_step = -1

    def describe(self, tr: Trainer) -> list[str]:
        """The start-up line; local shard paths are checked now rather than at the first evaluation."""
        k = tr.cfg.knn
        if not k.interval:
            return []
        spec = [set_shards(k.train_shards, "train"), set_shards(k.val_shards, "val")]
        for s in spec:
            if not is_remote(s):
                expand_shards(s)  # raises, naming the path, when there are no shards
        return [f"k-NN monitor: every {k.interval} epoch(s) and at the end | bank {spec[0]} | queries {spec[1]} | "
                f"k={k.k} T={k.temperature} features={k.features} max_images={k.max_images or 'all'}"]

    def on_epoch_end(self, tr: Trainer, epoch_done: int, final: bool) -> None:
        k = tr.cfg.knn
        if not k.interval or not (final or epoch_done % k.interval == 0) or tr.step == self._last_step:
            return
        self._last_step = tr.step
        c, d = tr.cfg, tr.dist
        data = c.data if c.data.backend != "synthetic" else dataclasses.replace(c.data, backend="auto")
        encoder = encoder_copy(tr.engine.module, c.model, d.device)
        stats = knn_evaluate(encoder, k, data, d.device, d.rank, d.world_size, c.train.seed, tr.autocast)
        del encoder
        stats.update(step=tr.step, epoch=epoch_done)
        self.history.append(stats)
        tr.log0(f"epoch {epoch_done} | step {tr.step} | {describe_knn(stats)}")
        if tr.logger is not None:
            tr.logger.log({"step": tr.step, "epoch": epoch_done, "knn_acc1": stats["acc1"],
                           "knn_acc5": stats["acc5"]})
