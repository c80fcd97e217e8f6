"""Metrics from one place: throughput, TFLOP/s and MFU from the analytic FLOPs, peak memory, data wait.

Every log interval the training program hands the accumulated numbers to :class:`MetricsLogger`, which
prints one line, appends one JSONL record and writes TensorBoard scalars when tensorboard is installed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name()
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("L40S", 362.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),  # fp16 tensor cores; V100 has no bf16
]


def peak_tflops(device_name: str | None = None, override: float = 0.0) -> float | None:
    """Peak dense bf16 TFLOP/s of a CUDA card (``override`` wins); None when unknown or on CPU."""
    if override > 0:
        return override
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


class MetricsLogger:
    """One console line + one JSONL record per log interval (rank 0 only), TensorBoard when available."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
                except Exception:  # tensorboard not installed: JSONL only
                    self.tb = None

    def log(self, record: dict[str, Any], line: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, step)
        if line is not None:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_line(rec: dict[str, Any]) -> str:
    """The console line of one log record."""
    parts = [f"step {rec['step']}", f"epoch {rec['epoch']:.2f}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.3e}"]
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {rec['grad_norm']:.3f}")
    parts.append(f"{rec['img_per_s']:.1f} img/s")
    parts.append(f"{rec['tflops']:.2f} TFLOP/s")
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    parts.append(f"data {100 * rec['data_wait']:.0f}%")
    if rec.get("peak_mem_gb") is not None:
        parts.append(f"mem {rec['peak_mem_gb']:.1f} GB")
    return " | ".join(parts)
