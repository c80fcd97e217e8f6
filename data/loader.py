"""Which loader a config asks for: :func:`build_loader` (the factory, on top of the backends) and the backend
choice. The shared interface lives in :mod:`fastmae.data.base`; its names are re-exported here."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from .base import BatchPlan, EpochLayout, ShardLoader, normalize_uint8
from .constants import BACKENDS, DTYPES, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, MODES, READ_CHOICES, check_section
from .index import ShardError, ShardIndex, expand_shards
from .randaug import parse_policy, unavailable_reason
from .remote import fetch_shards, is_remote
from .sampling import PAD_LABEL


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports here."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return False
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``dali`` when DALI imports, else ``torch``; others are checked and returned."""
    if backend not in BACKENDS:
        raise ValueError(f"data.backend={backend!r} is not valid; valid choices: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "dali" if dali_available() else "torch"
    if backend == "dali" and not dali_available():
        raise ImportError("data.backend=dali but nvidia.dali does not import; pip install fastmae[dali] "
                          "or use data.backend=torch")
    return backend


def build_loader(
    cfg: Any,
    *,
    img_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    mode: str = "train",
    randaug: str = "",
    labels: bool = False,
) -> Any:
    """The loader ``cfg`` (a :class:`fastmae.config.DataConfig`) asks for, for this rank.

    ``cfg.shards == ""`` reads the bundled sample; otherwise a directory, brace pattern or glob of shards, or
    the same behind ``s3://``, ``gs://`` or ``http(s)://`` (streamed, :mod:`fastmae.data.stream`, or with
    ``cfg.read = "global"`` fetched once into ``cfg.cache_dir``, :mod:`fastmae.data.remote`).
    Resampling is ``cfg.interpolation`` (bicubic: the paper's recipe).
    ``randaug`` (fine-tuning only; MAE pre-training is crop + flip): a timm RandAugment policy such as
    ``"rand-m9-mstd0.5-inc1"`` applied per training sample after the crop (:mod:`fastmae.data.randaug`); the
    torch backend needs timm for it (ImportError otherwise), the synthetic backend refuses it.
    ``labels``: every sample must carry a ``.cls`` label (classification), checked before anything is read.
    Training (``mode="train"``) reads full global batches only unless ``cfg.drop_last`` is false; evaluation
    reads every sample once.
    """
    check_section(cfg)
    backend = resolve_backend(cfg.backend)
    if randaug:
        parse_policy(randaug)  # fail on a malformed policy or mode before anything is built
        if mode != "train":
            raise ValueError(f"randaug={randaug!r} applies to mode='train' only (evaluation is a centre crop)")
        reason = unavailable_reason(backend)
        if reason is not None:
            err = ValueError if backend == "synthetic" else ImportError
            raise err(f"randaug={randaug!r} cannot run: {reason}")
    if backend == "synthetic":
        from .synthetic import SyntheticLoader

        dev = torch.device(device)
        return SyntheticLoader(
            cfg.batch_size, img_size, device=dev,
            dtype=DTYPES[cfg.dtype] if dev.type == "cuda" else torch.float32,
            size=cfg.synthetic_size, seed=seed, rank=rank, world_size=world_size,
        )
    remote = bool(cfg.shards) and is_remote(cfg.shards)
    read = resolve_read(cfg.read, remote)
    cache_dir = cfg.cache_dir or None
    spool = None
    if remote and read == "stream":  # s3:// gs:// http(s)://: fetched just ahead of use, deleted after
        from .stream import open_stream

        index, spool = open_stream(cfg.shards, cache_dir, rank, fetchers=cfg.stream_fetchers,
                                   log=print if rank == 0 else None)
    else:
        if remote:  # fetched once into the local cache
            shards = fetch_shards(cfg.shards, cache_dir, progress=rank == 0, log=print if rank == 0 else None)
        elif cfg.shards:
            shards = expand_shards(cfg.shards)
        else:
            from .sample import bundled_sample_dir

            shards = expand_shards(bundled_sample_dir())
        index = ShardIndex(shards)
    try:
        if labels:
            index.require_labels()
        return _make(backend, index, cfg, img_size=img_size, rank=rank, world_size=world_size, seed=seed,
                     device=device, mode=mode, randaug=randaug, read=read, spool=spool)
    except BaseException:
        if spool is not None:
            spool.close()
        raise


def resolve_read(read: str, remote: bool) -> str:
    """``auto`` -> ``stream`` for remote shards, ``global`` for local ones; others are checked and returned."""
    if read not in READ_CHOICES:
        raise ValueError(f"data.read={read!r} is not valid; valid choices: {', '.join(READ_CHOICES)}")
    if read == "auto":
        return "stream" if remote else "global"
    return read


def _make(backend: str, index: ShardIndex, cfg: Any, **run: Any) -> Any:
    """The loader of ``backend`` over ``index``: its settings from ``cfg``, this run's and rank's from ``run``."""
    if backend == "dali":
        from .dali_pipeline import DaliLoader

        return DaliLoader(index, cfg, **run)
    from .torch_loader import TorchLoader

    return TorchLoader(index, cfg, **run)


__all__ = ["BatchPlan", "EpochLayout", "ShardLoader", "build_loader", "resolve_backend", "dali_available",
           "PAD_LABEL", "ShardError", "normalize_uint8", "DTYPES", "IMAGENET_MEAN", "IMAGENET_STD",
           "INTERPOLATIONS", "MODES"]
