"""Helpers for tests that start DeepSpeed programs in subprocesses."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def deepspeed_env() -> dict[str, str]:
    """Environment for DeepSpeed subprocesses: fixed threads and one cache for its compiled comm op
    (compiled once per machine, ~30-60 s); stray ``lock`` files from a killed build are removed, since
    they make the next build wait forever."""
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", REPO / ".cache" / "torch_extensions"))
    cache.mkdir(parents=True, exist_ok=True)
    for lock in cache.rglob("lock"):
        lock.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(cache), PYTHONUNBUFFERED="1")
    env.pop("FASTMAE_TEST_NAN_AT", None)
    return env


def free_port() -> int:
    """A free TCP port on the loopback interface (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
