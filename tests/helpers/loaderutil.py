"""Helpers for the data loader tests (in-process, and with worker processes): the labelled gradient images of
the ``ids_shards`` fixture (tests/conftest.py), loader settings, an epoch read whole, hand-made shards with
damaged samples."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fastmae.data import dali_available
from PIL import Image

from fastmae.config import DataConfig

# unique labels of varying digit counts: a label identifies its sample
IDS = [3, 42, 7, 999, 12345, 5, 80, 123456, 64, 1, 2048, 9, 31337, 600, 11, 77, 4096, 8, 100000, 13, 250, 6,
       70]
NO_DALI = "nvidia.dali not installed: pip install -e '.[dali]'"
DALI_ONLY = pytest.mark.skipif(not dali_available(), reason=NO_DALI)


def gradient(w: int, h: int) -> np.ndarray:
    """R grows with x, G with y: a crop's pixel values reveal its box and whether it was flipped."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)


def loader_cfg(backend: str, shards: Path | str, batch: int = 4, workers: int = 0, **kw: object) -> DataConfig:
    return dataclasses.replace(DataConfig(), backend=backend, shards=str(shards), batch_size=batch,
                               num_workers=max(workers, 1) if backend == "dali" else workers, **kw)


def read_epoch(loader: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]  # type: ignore[attr-defined]


def labelled_tar(path: Path, samples: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for n, (key, data) in enumerate(samples):
            for ext, payload in (("cls", str(n).encode()), ("jpg", data)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def damaged_shard(folder: Path) -> tuple[bytes, bytes]:
    """``folder/000000.tar``: a, b, broken (a JPEG body only the decoder rejects), c, garbage (no JPEG header),
    d, labelled 0-5; returns a good JPEG and the garbage."""
    buf = io.BytesIO()
    Image.fromarray(gradient(80, 60)).save(buf, "JPEG")
    good = buf.getvalue()
    broken = good[:300] + b"\x00" * 200 + good[500:600]
    garbage = b"\xff\xd8\xff\xe0 not a JPEG " * 3
    labelled_tar(folder / "000000.tar", [("a", good), ("b", good), ("broken", broken), ("c", good),
                                         ("garbage", garbage), ("d", good)])
    return good, garbage
