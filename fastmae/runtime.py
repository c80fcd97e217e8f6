"""Process-level set-up shared by the programs: distributed init, device, seeds, DeepSpeed config."""

from __future__ import annotations

import datetime
import json
import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError

BUNDLED_DS_CONFIGS = ("zero1.json", "zero2.json", "zero3.json")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 10.0) -> DistInfo:
    """Start torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU) and pick this rank's device.

    ZeRO's collectives ignore the ``timeout`` given to ``init_distributed``; torch's module default is
    what they use, so it is lowered here first: a hung rank fails within ``timeout_minutes``.
    """
    import deepspeed
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    timeout = datetime.timedelta(minutes=timeout_minutes)
    distributed_c10d.default_pg_timeout = timeout
    if "RANK" not in os.environ:  # plain `python fastmae/train.py`: a world of one, no launcher, no MPI
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def shutdown_distributed() -> None:
    """Barrier and destroy the process group (gloo can abort at interpreter exit otherwise)."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; ranks get different streams."""
    s = seed + 1009 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def mask_seed(seed: int, micro_batch_id: int) -> int:
    """The masking seed of one global micro batch: a pure function, so a resumed run masks identically."""
    h = (seed * 0x9E3779B1 + micro_batch_id * 0xC2B2AE3D + 0x85EBCA77) & 0xFFFFFFFFFFFF
    h ^= h >> 17
    return (h * 0x2545F491) & 0x7FFFFFFF


# ----------------------------------------------------------------------------- DeepSpeed config


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """A DeepSpeed JSON config: a bare bundled name (``zero2.json`` or ``zero2``) or a path."""
    path = Path(name_or_path)
    if path.is_file():
        return json.loads(path.read_text())
    name = name_or_path if name_or_path.endswith(".json") else f"{name_or_path}.json"
    if "/" not in name and name in BUNDLED_DS_CONFIGS:
        return json.loads(resources.files("fastmae").joinpath("configs", name).read_text())
    raise ConfigError(
        f"DeepSpeed config {name_or_path!r} is neither a file nor a bundled config; "
        f"bundled: {', '.join(BUNDLED_DS_CONFIGS)}"
    )


def _fill(section: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``key`` to ``value`` unless the user wrote a different explicit value (then refuse)."""
    current = section.get(key, "auto")
    if current == "auto" or current == value:
        section[key] = value
        return
    raise ConfigError(
        f"DeepSpeed config sets {where}{key}={current!r} but the fastmae config implies {value!r}; "
        f"set it to \"auto\" (fastmae fills it) or change the fastmae setting instead"
    )


def fill_ds_config(
    ds: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int, precision: str,
    clip_grad: float,
) -> dict[str, Any]:
    """Fill the values fastmae owns (batch sizes, precision, clipping) so the two configs never disagree."""
    ds = json.loads(json.dumps(ds))  # deep copy
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch, "")
    _fill(ds, "gradient_accumulation_steps", grad_accum, "")
    _fill(ds, "train_batch_size", micro_batch * grad_accum * world_size, "")
    _fill(ds, "gradient_clipping", float(clip_grad), "")
    bf16 = ds.setdefault("bf16", {})
    fp16 = ds.setdefault("fp16", {})
    want_bf16, want_fp16 = precision == "bf16", precision == "fp16"
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = want_bf16
    if fp16.get("enabled", "auto") == "auto":
        fp16["enabled"] = want_fp16
    if bool(bf16["enabled"]) != want_bf16 or bool(fp16["enabled"]) != want_fp16:
        raise ConfigError(
            f"DeepSpeed config enables bf16={bf16['enabled']} fp16={fp16['enabled']} but "
            f"train.precision={precision!r}; make them agree"
        )
    if ds.get("optimizer") or ds.get("scheduler"):
        raise ConfigError("remove 'optimizer'/'scheduler' from the DeepSpeed config: fastmae builds both "
                          "from its optim section (the paper's recipe)")
    return ds
